//! Adversarial devices: what an attacker's update becomes (sign flip, scaling, noise, a colluders' shared
//! vector) and the corrupted text it may train on instead. What must never live here: which devices
//! attack (the scenario says) or how the coordinator defends (its strategies).

use super::*;

impl Sim<'_> {
    /// An adversarial device's update: its honest delta transformed by the attack.
    pub(super) fn attack(
        &self,
        c: usize,
        round: u64,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        body: &[u8],
    ) -> Result<Vec<u8>, SimError> {
        let kind = self.scen.attack.kind;
        if kind == AttackKind::CorruptText {
            return Ok(body.to_vec());
        }
        let schema = &manifest.adapter_schema;
        let mut delta = match &task.secagg {
            Some(sa) => starling_client::secure::decode_body(sa, body)?,
            None => decode_update(body, schema, &UpdateLimits::default())?,
        };
        let s = self.scen.attack.scale;
        // A secure round's weight value (after the delta) is left as it is.
        let weight = delta.split_off(schema.num_params().min(delta.len()));
        match kind {
            AttackKind::SignFlip => delta.iter_mut().for_each(|x| *x *= -s),
            AttackKind::Scale => delta.iter_mut().for_each(|x| *x *= s),
            AttackKind::Noise => {
                let rms = (delta.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>()
                    / delta.len().max(1) as f64)
                    .sqrt();
                let mut rng =
                    ChaCha8Rng::seed_from_u64(derive(self.seed, "noise", c as u64, round));
                for x in delta.iter_mut() {
                    *x = (data::normal(&mut rng) * rms * f64::from(s)) as f32;
                }
            }
            AttackKind::Collude => match self.last_step(manifest.version)? {
                Some(step) if step.len() == delta.len() => {
                    delta = step.into_iter().map(|x| -s * x).collect();
                }
                _ => delta.iter_mut().for_each(|x| *x *= -s),
            },
            AttackKind::CorruptText => {}
        }
        let mut rng = ChaCha20Rng::seed_from_u64(derive(self.seed, "attack-enc", c as u64, round));
        Ok(match &task.secagg {
            Some(sa) => {
                delta.extend(weight);
                starling_client::secure::encode_values(sa, &delta, &mut rng)?
            }
            None => encode_update(schema, &delta, task.encoding, &mut rng)?,
        })
    }

    /// The step that published `version`, v − (v − 1), from the coordinator's public models (what any
    /// device can fetch); `None` for the first version.
    fn last_step(&self, version: ModelVersion) -> Result<Option<Vec<f32>>, SimError> {
        let Some(previous) = version.0.checked_sub(1).map(ModelVersion) else {
            return Ok(None);
        };
        let store = self.coord.store();
        let (Some(now), Some(before)) = (store.model(version)?, store.model(previous)?) else {
            return Ok(None);
        };
        let (now, before) = (
            adapter_values(&now.adapter)?,
            adapter_values(&before.adapter)?,
        );
        Ok(Some(now.iter().zip(&before).map(|(a, b)| a - b).collect()))
    }
}

/// Text with the bytes of each line shuffled (the corrupted-text attack's training data).
pub(super) fn corrupt(text: &str, seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut chars: Vec<char> = line.chars().collect();
        chars.shuffle(&mut rng);
        out.extend(chars);
        out.push('\n');
    }
    out
}
