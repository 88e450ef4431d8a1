//! The round core: what a round *does*, as values in and values out. The [`engine`](crate::engine) decides
//! *when* (selection, deadlines, phases); this core decides *what*: which strategy aggregates and how
//! (clipping and noise live in the DP strategy), what a round charges to the global privacy ledger and
//! whether the budget allows it, the step on the adapter, the new version's manifest and its signature,
//! and the [`Task`] every device is handed. Drivers move bytes: the QUIC service (and the simulator through
//! it) reads the store, hands the core what it read, writes what the core returns in one transaction, and
//! then tells the core the result is durable ([`RoundCore::commit`]).
//!
//! The one Task builder ([`task`]) is here; the one noise rule is [`strategy::charged_multiplier`], which the
//! core charges with and the simulator calibrates with.
//! What must never live here: I/O of any kind — files, the store, sockets, clocks (`now` is handed in),
//! randomness other than the DP strategy's noise.

use starling_privacy::ddg::DdgEvent;
use starling_privacy::{
    Budget, Checkpoint, DpEvent, Ledger, LedgerEntry, LedgerScope, NoisePlacement, PrivacyError,
};
use starling_protocol::manifest::{DpMode, DpRecord, Manifest, SignedManifest};
use starling_protocol::message::{
    DpSgdTask, DpTask, LoraSpec, SecAggTask, Task, TrainParams, UserDp,
};
use starling_protocol::update::adapter_bytes;
use starling_protocol::{AdapterSchema, Digest, Encoding, ModelVersion, RoundId, SigningIdentity};
use starling_secagg::{RoundParams, SecAggError};

use crate::config::{CoordinatorConfig, DpPlacement, UpdateEncoding};
use crate::engine::{Engine, EngineError, RoundRecord};
use crate::strategy::{self, AggregateError, ClientUpdate, DpFedAvg, Strategy, StrategyState};

/// A published model version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedModel {
    /// The signed manifest, exactly as served.
    pub manifest: SignedManifest,
    /// The adapter as a flat f32 vector in schema order, little-endian bytes.
    pub adapter: Vec<u8>,
}

/// What a round's aggregation charged to the global privacy ledger.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundCharge {
    /// Client sampling rate q of the round.
    pub sampling_rate: f64,
    /// Effective noise multiplier certified for the round's noise.
    pub noise_multiplier: f64,
    /// ε spent in total after this round.
    pub epsilon_after: f64,
    /// Mean training loss of the round's updates.
    pub mean_train_loss: f32,
    /// Updates aggregated.
    pub updates: u32,
}

/// Errors of the round core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Aggregation failed.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// Privacy accounting refused (the budget) or failed.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// The secure-aggregation settings give no encoding (checked at start-up; a bug if it shows).
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    /// A privacy charge was asked of a coordinator that keeps no ledger (a bug if it shows).
    #[error("privacy accounting without a privacy ledger (privacy.mode = off)")]
    NoLedger,
    /// The adapter handed in is not the schema's length (a bug of the driver if it shows).
    #[error("the parent adapter holds {found} values, the schema {expected}")]
    AdapterLength {
        /// Values the schema says.
        expected: usize,
        /// Values handed in.
        found: usize,
    },
    /// An edge aggregator's partial sum is not the schema's length.
    #[error("a partial sum holds {found} values, the schema {expected}")]
    PartialLength {
        /// Values the schema says.
        expected: usize,
        /// Values in the partial sum.
        found: usize,
    },
    /// A publication was committed out of order (a bug of the driver if it shows).
    #[error("{found} committed while {expected} is the next version")]
    OutOfOrder {
        /// The version the core expects next.
        expected: ModelVersion,
        /// The version committed.
        found: ModelVersion,
    },
}

/// What a round's aggregation starts from.
#[derive(Debug, Clone)]
pub enum RoundInput {
    /// The decoded deltas (with their FedAvg weights) and the sum of their training losses.
    Updates {
        /// (examples, delta) per update.
        deltas: Vec<(u64, Vec<f32>)>,
        /// Σ training loss.
        loss: f64,
    },
    /// A round of which only the weighted sum of `count` deltas is known: a secure round's unmasked sum,
    /// or edge aggregators' partial sums combined ([`RoundInput::from_partials`]).
    Sum {
        /// The decoded sum.
        sum: Vec<f32>,
        /// Devices in it.
        count: usize,
        /// Their total weight.
        weight: f64,
        /// Σ of their training losses, where it was collected (not in secure rounds: one more
        /// per-device signal).
        loss: Option<f64>,
    },
}

impl RoundInput {
    /// Devices behind it.
    pub fn count(&self) -> usize {
        match self {
            RoundInput::Updates { deltas, .. } => deltas.len(),
            RoundInput::Sum { count, .. } => *count,
        }
    }

    /// A round from the partial sums edge aggregators forwarded: since aggregation is a sum, their sum,
    /// counts, weights and losses are the round's (equal to the flat round's up to float summation
    /// order). Every partial must hold `len` values ([`sum_of`]).
    pub fn from_partials(partials: &[PartialSum], len: usize) -> Result<Self, CoreError> {
        if let Some(p) = partials.iter().find(|p| p.sum.len() != len) {
            return Err(CoreError::PartialLength {
                expected: len,
                found: p.sum.len(),
            });
        }
        let sums: Vec<&[f32]> = partials.iter().map(|p| p.sum.as_slice()).collect();
        Ok(RoundInput::Sum {
            sum: sum_of(&sums, len),
            count: partials.iter().map(|p| p.count).sum(),
            weight: partials.iter().map(|p| p.weight).sum(),
            loss: Some(partials.iter().map(|p| p.loss).sum()),
        })
    }
}

/// The sum of equal-length vectors `vs` (each `len` values): parallel over chunks of the output, each
/// chunk reading every input once and adding four inputs per pass, so the chunk's accumulator is read
/// and written a quarter as often as the inputs are read (the root's work is then a stream over the
/// partial sums, at memory speed).
fn sum_of(vs: &[&[f32]], len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 16 * 1024;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, acc)| {
        let range = c * CHUNK..c * CHUNK + acc.len();
        let mut fours = vs.chunks_exact(4);
        for g in &mut fours {
            let (a, b) = (&g[0][range.clone()], &g[1][range.clone()]);
            let (x, y) = (&g[2][range.clone()], &g[3][range.clone()]);
            for ((((o, a), b), x), y) in acc.iter_mut().zip(a).zip(b).zip(x).zip(y) {
                *o += (a + b) + (x + y);
            }
        }
        for v in fours.remainder() {
            for (o, a) in acc.iter_mut().zip(&v[range.clone()]) {
                *o += a;
            }
        }
    });
    out
}

/// What an edge aggregator forwards to the root for one round: the weighted sum of its cohort's deltas
/// (each already clipped by its device where the task asked for user-level DP), with its count, total
/// weight and summed training loss.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartialSum {
    /// Σ wᵢ·deltaᵢ over the cohort.
    pub sum: Vec<f32>,
    /// Devices in it.
    pub count: usize,
    /// Σ wᵢ.
    pub weight: f64,
    /// Σ of the devices' training losses.
    pub loss: f64,
}

/// A cohort's partial sum (see [`RoundCore::partial_sum`]): with `clip` (user-level DP on) each delta
/// clipped to it and weighted one, else weighted by its examples. The edge aggregator calls this with the
/// clip its round's task names; the root's flat DP-FedAvg sums the same way ([`strategy::clipped_sum`]).
pub fn cohort_sum(
    updates: &[(ClientUpdate<'_>, f32)],
    clip: Option<f64>,
) -> Result<PartialSum, CoreError> {
    let views: Vec<ClientUpdate<'_>> = updates.iter().map(|(u, _)| *u).collect();
    let loss = updates.iter().map(|(_, l)| f64::from(*l)).sum();
    let (sum, weight) = match clip {
        None => {
            let weights: Vec<f32> = views.iter().map(|u| u.num_examples as f32).collect();
            let weight = weights.iter().map(|w| f64::from(*w)).sum();
            (strategy::weighted_sum(&views, &weights)?, weight)
        }
        Some(clip) => (strategy::clipped_sum(&views, clip)?, views.len() as f64),
    };
    Ok(PartialSum {
        sum,
        count: views.len(),
        weight,
        loss,
    })
}

/// Rounds between two checkpoints of the global ledger at least ([`RoundCore::ledger_checkpoint`]).
pub const CHECKPOINT_EVERY: usize = 10;

/// What the driver read back from durable state for a restarted core.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// The strategy's persisted state (server momentum, moments).
    pub strategy: StrategyState,
    /// Every round's Gaussian (or discrete, see `discrete`) charge, in round order.
    pub charges: Vec<(RoundId, RoundCharge)>,
    /// The rounds charged as the distributed discrete Gaussian, with their events.
    pub discrete: Vec<(RoundId, DdgEvent)>,
    /// The global ledger's last stored checkpoint ([`RoundCore::ledger_checkpoint`]), if one was.
    pub ledger_checkpoint: Option<Checkpoint>,
}

/// What one round charges to the global ledger.
#[derive(Debug, Clone, Copy)]
enum RoundEvent {
    /// The subsampled Gaussian (central noise, or continuous noise shares in the clear).
    Gaussian(DpEvent),
    /// Discrete Gaussian shares of the devices in a secure round.
    Ddg(DdgEvent),
}

/// A new version, ready to be written in one store transaction and then [committed](RoundCore::commit).
#[derive(Debug, Clone)]
pub struct Publication {
    /// The round it closes.
    pub round: RoundId,
    /// The new version.
    pub version: ModelVersion,
    /// Its signed manifest and adapter.
    pub model: PublishedModel,
    /// The ledger record of the round.
    pub charge: RoundCharge,
    /// The discrete Gaussian event of a secure round with device noise (stored beside the ledger).
    pub discrete: Option<DdgEvent>,
    /// The strategy's state after this round.
    pub strategy: StrategyState,
    /// The Gaussian event charged to the in-memory ledger on commit.
    gaussian: Option<DpEvent>,
}

/// The round policy of one coordinator (see the module docs): the engine, the strategy, the ledger and the
/// keys, driven with values.
pub struct RoundCore {
    /// When rounds open and close (sans-IO too); drivers feed it devices' events directly.
    pub engine: Engine,
    strategy: Box<dyn Strategy>,
    ledger: Option<Ledger>,
    /// The ledger's length when [`RoundCore::ledger_checkpoint`] last handed out a checkpoint.
    checkpointed_at: Option<usize>,
    /// Rounds charged as the distributed discrete Gaussian (their Gaussian-free share of the ledger).
    ddg: Vec<DdgEvent>,
    cfg: CoordinatorConfig,
    schema: AdapterSchema,
    base_digest: Digest,
    signing: SigningIdentity,
}

impl std::fmt::Debug for RoundCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundCore")
            .field("latest", &self.engine.latest())
            .field("strategy", &self.strategy.name())
            .finish()
    }
}

/// The strategy `cfg` asks for, stepping by DP-FedAvg's noisy mean when user-level DP is on
/// (`expected_clients`: its fixed denominator; `simulation_noise_key`: reproducible, **not private**
/// noise for simulations).
fn build_strategy(
    cfg: &CoordinatorConfig,
    expected_clients: f64,
    simulation_noise_key: Option<[u8; 32]>,
) -> Result<Box<dyn Strategy>, CoreError> {
    let p = &cfg.privacy;
    Ok(match p.mode {
        DpPlacement::Off => strategy::build(&cfg.strategy)?,
        DpPlacement::Central | DpPlacement::Distributed => {
            let placement = if p.mode == DpPlacement::Central {
                NoisePlacement::Central
            } else {
                NoisePlacement::Distributed {
                    clients: p.noise_clients,
                }
            };
            let dp = DpFedAvg::new(
                p.clip,
                p.noise_multiplier,
                expected_clients,
                placement,
                strategy::build(&cfg.strategy)?,
            )?;
            Box::new(match simulation_noise_key {
                Some(key) => dp.with_simulation_key(key),
                None => dp,
            })
        }
    })
}

/// The global ledger rebuilt from stored charges (`None` with DP off). ε is recomputed from the stored
/// events, never read back; every charge is kept, so a budget lowered below what was spent shows as
/// exhausted (charging them one by one against the lowered budget would drop the rounds past it, and
/// under-report what was spent).
fn rebuild_ledger(
    cfg: &CoordinatorConfig,
    restored: &Restored,
) -> Result<Option<Ledger>, CoreError> {
    if cfg.privacy.mode == DpPlacement::Off {
        return Ok(None);
    }
    let discrete: std::collections::BTreeSet<RoundId> =
        restored.discrete.iter().map(|(r, _)| *r).collect();
    let mut entries = Vec::with_capacity(restored.charges.len());
    for (round, c) in &restored.charges {
        if discrete.contains(round) {
            continue;
        }
        entries.push(LedgerEntry {
            label: format!("round {}", round.0),
            event: DpEvent::new(c.sampling_rate, c.noise_multiplier, 1)?,
            epsilon_after: c.epsilon_after,
        });
    }
    let budget = Budget {
        epsilon: cfg.privacy.epsilon_budget,
        delta: cfg.privacy.delta,
    };
    let kind = cfg.privacy.accountant;
    if let Some(cp) = &restored.ledger_checkpoint {
        match Ledger::resume(LedgerScope::Global, budget, kind, entries.clone(), Some(cp)) {
            Ok(l) => return Ok(Some(l)),
            // Taken on other rounds (a store restored from a backup) or unreadable: it only saves time.
            Err(PrivacyError::Corrupt(why)) => {
                tracing::warn!("the privacy ledger's checkpoint is not used ({why}): composing every round again")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Ledger::with_entries(
        LedgerScope::Global,
        budget,
        kind,
        entries,
    )?))
}

/// A secure sum of `count` devices (words modulo `2^bits`) decoded with the `encoding` they used: the
/// values and their total weight (the devices' count, or — with a `weight_cap` — the sum of the weights
/// they masked as one more value). The root's secure round and an edge aggregator's secure cohort both
/// decode with it.
pub fn decode_secure_sum(
    encoding: &starling_secagg::mask::Encoding,
    weight_cap: u64,
    sum: &[u32],
    count: usize,
    bits: u32,
) -> Result<(Vec<f32>, f64), starling_secagg::SecAggError> {
    let mut sum = encoding.decode_sum(sum, bits)?;
    let weight = if weight_cap > 0 {
        let w = sum.pop().unwrap_or(0.0);
        f64::from(w) / f64::from(encoding.clip)
    } else {
        count as f64
    };
    Ok((sum, weight))
}

/// The one Task builder: round `round` of `manifest`'s version, due at `deadline`, with FedProx `mu` and,
/// in a secure round, the device's part in it ([`crate::secagg::SecAggConfig::task`]).
pub fn task(
    cfg: &CoordinatorConfig,
    round: RoundId,
    manifest: SignedManifest,
    deadline: u64,
    mu: f32,
    secagg: Option<SecAggTask>,
) -> Task {
    let t = &cfg.task;
    let p = &cfg.privacy;
    let dp_sgd = (t.dp_sgd_noise_multiplier > 0.0).then_some(DpSgdTask {
        noise_multiplier: t.dp_sgd_noise_multiplier,
        clip: t.dp_sgd_clip,
        sampling_rate: t.dp_sgd_sampling_rate,
        delta: t.dp_sgd_delta,
    });
    let user = match p.mode {
        DpPlacement::Off => None,
        DpPlacement::Central => Some(UserDp::Clip { clip: p.clip }),
        DpPlacement::Distributed => Some(UserDp::ClipAndNoise {
            clip: p.clip,
            noise_multiplier: p.noise_multiplier,
            clients: p.noise_clients,
        }),
    };
    let dp = DpTask { user, dp_sgd };
    let a = &cfg.adapter;
    Task {
        round,
        manifest,
        deadline_unix_ms: deadline,
        params: TrainParams {
            local_steps: t.local_steps,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            learning_rate: t.learning_rate,
            fedprox_mu: mu,
            optimizer: t.optimizer,
        },
        dp,
        lora: LoraSpec {
            rank: a.rank as u32,
            alpha: a.alpha,
            targets: a.targets.clone(),
        },
        encoding: match t.encoding {
            UpdateEncoding::F32 => Encoding::F32,
            UpdateEncoding::Int8 => Encoding::Int8 {
                block: t.int8_block,
            },
        },
        max_update_bytes: t.max_update_bytes,
        secagg,
    }
}

impl RoundCore {
    /// A core for `cfg` over `engine` (built and resumed by the driver), restored from what the driver read
    /// back (`restored`); `cohort` is the clients a round selects (DP-FedAvg's fixed denominator).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: CoordinatorConfig,
        schema: AdapterSchema,
        base_digest: Digest,
        signing: SigningIdentity,
        engine: Engine,
        cohort: usize,
        simulation_noise_key: Option<[u8; 32]>,
        restored: Restored,
    ) -> Result<Self, CoreError> {
        let mut strategy = build_strategy(&cfg, (cohort as f64).max(1.0), simulation_noise_key)?;
        let ledger = rebuild_ledger(&cfg, &restored)?;
        strategy.restore(restored.strategy)?;
        Ok(Self {
            engine,
            strategy,
            ledger,
            checkpointed_at: None,
            ddg: restored.discrete.into_iter().map(|(_, e)| e).collect(),
            cfg,
            schema,
            base_digest,
            signing,
        })
    }

    /// The configuration the core runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// The Task for round `round` of `manifest`'s version (see [`task`]), with the strategy's FedProx μ.
    pub fn task(
        &self,
        round: RoundId,
        manifest: SignedManifest,
        deadline: u64,
        secagg: Option<(RoundParams, u32)>,
    ) -> Task {
        task(
            &self.cfg,
            round,
            manifest,
            deadline,
            self.strategy.proximal_mu(),
            secagg.map(|(params, id)| {
                self.cfg
                    .secure_aggregation
                    .task(params, id, self.schema.num_params())
            }),
        )
    }

    /// A secure round's sum (modulo `2^bits` of `params`) of `count` devices, decoded: the values and
    /// their total weight (the devices' count, or their masked weights' sum with a weight cap).
    pub fn secure_sum(
        &self,
        sum: &[u32],
        count: usize,
        params: &RoundParams,
    ) -> Result<RoundInput, CoreError> {
        let sa = &self.cfg.secure_aggregation;
        let encoding = sa
            .task(params.clone(), 0, self.schema.num_params())
            .encoding()?;
        let (sum, weight) = decode_secure_sum(&encoding, sa.weight_cap, sum, count, params.bits)?;
        Ok(RoundInput::Sum {
            sum,
            count,
            weight,
            loss: None,
        })
    }

    /// The partial sum an edge aggregator forwards for `updates` (deltas with their examples and
    /// training losses), made as the root would have made its share of a flat round: weighted by examples
    /// for the FedAvg family; under user-level DP each delta clipped to the configured bound (the
    /// aggregator sees single deltas, so it clips them as DP-FedAvg at the root would) and weighted one
    /// each (DP-FedAvg's fixed denominator counts devices). Refused for rules that need every update
    /// (median, trimmed mean, Krum, norm bounding): their result is not a function of sums.
    pub fn partial_sum(
        &self,
        updates: &[(ClientUpdate<'_>, f32)],
    ) -> Result<PartialSum, CoreError> {
        if !self.strategy.linear() {
            return Err(AggregateError::InvalidParameter(format!(
                "{} needs every update, not only their sum: not in hierarchical mode",
                self.strategy.name()
            ))
            .into());
        }
        let clip = (self.cfg.privacy.mode != DpPlacement::Off).then_some(self.cfg.privacy.clip);
        cohort_sum(updates, clip)
    }

    /// ε once `round` is charged, or [`CoreError::Privacy`] if the budget cannot pay for it (`None`: no
    /// user-level DP). Exactly what [`RoundCore::aggregate`] will charge (the same sampling rate, from the
    /// same record), so a driver asks before serving the round's tasks: devices never train for a round
    /// that would be refused. Charges nothing.
    pub fn preview_epsilon(&self, round: &RoundRecord) -> Result<Option<f64>, CoreError> {
        let (sampling_rate, eff) = self.rate_and_multiplier(round)?;
        Ok(self.charge(sampling_rate, eff)?.map(|(_, eps)| eps))
    }

    /// The sampling rate `round` is charged at and the effective Gaussian multiplier of its noise.
    fn rate_and_multiplier(&self, round: &RoundRecord) -> Result<(f64, f64), CoreError> {
        // Behind edge aggregators the root sees aggregators, not the devices each one took (first come,
        // not a random sample): no amplification by sampling is claimed, every round is charged at q = 1.
        let sampling_rate = if self.cfg.hierarchy.enabled {
            1.0
        } else {
            (round.selected.len() as f64 / round.eligible.max(1) as f64).min(1.0)
        };
        let p = &self.cfg.privacy;
        let eff = strategy::charged_multiplier(
            p.mode == DpPlacement::Central,
            p.clip,
            p.noise_multiplier,
            self.schema.num_params(),
        )?;
        Ok((sampling_rate, eff))
    }

    /// The event a round at `sampling_rate` and multiplier `eff` charges, and ε after it, refused past
    /// the budget.
    fn charge(&self, sampling_rate: f64, eff: f64) -> Result<Option<(RoundEvent, f64)>, CoreError> {
        match self.round_event(sampling_rate, eff)? {
            Some(e) => {
                let eps = self.epsilon_after(&e)?;
                Ok(Some((e, eps)))
            }
            None => Ok(None),
        }
    }

    /// Aggregates `round` from `input` onto `parent` (the adapter of the round's model version) and signs
    /// the next version, whose parent manifest is `latest` (the newest published version's body digest).
    /// A round that would exceed the privacy budget is refused ([`CoreError::Privacy`]) before anything
    /// is computed. Nothing changes in the core's ledger until [`RoundCore::commit`].
    pub fn aggregate(
        &mut self,
        round: &RoundRecord,
        input: &RoundInput,
        parent: &[f32],
        latest: Digest,
        now: u64,
    ) -> Result<Publication, CoreError> {
        if parent.len() != self.schema.num_params() {
            return Err(CoreError::AdapterLength {
                expected: self.schema.num_params(),
                found: parent.len(),
            });
        }
        let (sampling_rate, eff) = self.rate_and_multiplier(round)?;
        let (event, spent) = match self.charge(sampling_rate, eff)? {
            Some((event, spent)) => (Some(event), Some(spent)),
            None => (None, None),
        };
        let step = match input {
            RoundInput::Updates { deltas, .. } => {
                let views: Vec<ClientUpdate<'_>> = deltas
                    .iter()
                    .map(|(n, d)| ClientUpdate {
                        num_examples: *n,
                        delta: d,
                    })
                    .collect();
                self.strategy.aggregate(&views)?
            }
            RoundInput::Sum { sum, weight, .. } => self.strategy.aggregate_sum(sum, *weight)?,
        };
        crate::failpoint::hit("aggregated");
        let mut adapter = parent.to_vec();
        for (a, s) in adapter.iter_mut().zip(&step) {
            *a += s;
        }
        let p = &self.cfg.privacy;
        let (dp, gaussian, discrete) = match (event, spent) {
            (Some(event), Some(spent)) => {
                let mode = match p.mode {
                    DpPlacement::Distributed => DpMode::UserDistributed {
                        clients: p.noise_clients,
                    },
                    _ => DpMode::UserCentral,
                };
                let record = DpRecord {
                    mode,
                    noise_multiplier: eff,
                    clip: p.clip,
                    epsilon_spent: spent,
                    delta: p.delta,
                };
                // Charged with the multiplier opendp certified for the noise actually drawn (central), or
                // as the devices' discrete shares (secure rounds with device noise).
                match event {
                    RoundEvent::Gaussian(e) => (record, Some(e), None),
                    RoundEvent::Ddg(e) => (record, None, Some(e)),
                }
            }
            _ => (DpRecord::OFF, None, None),
        };
        let version = ModelVersion(self.engine.latest().0 + 1);
        let bytes = adapter_bytes(&adapter);
        let manifest = Manifest {
            version,
            parent_digest: Some(latest),
            base_digest: self.base_digest,
            adapter_digest: Digest::of(&bytes),
            adapter_schema: self.schema.clone(),
            round: round.id,
            strategy: self.strategy.name(),
            dp,
            created_at_unix_ms: now,
        };
        let charge = RoundCharge {
            sampling_rate,
            noise_multiplier: spent.map_or(0.0, |_| eff),
            epsilon_after: spent.unwrap_or(0.0),
            mean_train_loss: match input {
                RoundInput::Updates { deltas, loss } => (loss / deltas.len().max(1) as f64) as f32,
                RoundInput::Sum {
                    loss: Some(loss),
                    count,
                    ..
                } => (loss / (*count).max(1) as f64) as f32,
                // Secure rounds: the devices' losses are not collected (they would be one more
                // per-device signal); recorded as 0.
                RoundInput::Sum { loss: None, .. } => 0.0,
            },
            updates: input.count() as u32,
        };
        Ok(Publication {
            round: round.id,
            version,
            model: PublishedModel {
                manifest: manifest.sign(&self.signing),
                adapter: bytes,
            },
            charge,
            discrete,
            strategy: self.strategy.state(),
            gaussian,
        })
    }

    /// Takes a publication the driver stored durably into the core: the ledger's charge, and the engine
    /// moves on to the next round.
    pub fn commit(&mut self, p: &Publication) -> Result<(), CoreError> {
        let expected = ModelVersion(self.engine.latest().0 + 1);
        if p.version != expected {
            return Err(CoreError::OutOfOrder {
                expected,
                found: p.version,
            });
        }
        if let Some(l) = &mut self.ledger {
            if let Some(e) = p.gaussian {
                // Previewed within the budget by `aggregate`; stored already, so it is recorded in memory
                // even if the budget has since been lowered (the next round is then refused).
                l.record(format!("round {}", p.round.0), e)?;
            }
        }
        if let Some(e) = p.discrete {
            self.ddg.push(e);
        }
        self.engine.published(p.round, p.version)?;
        Ok(())
    }

    /// The global ledger's checkpoint, for the driver to store after committing a round whose charge
    /// started a new run of identical rounds (a sampling rate or multiplier other than the round
    /// before's), at most every [`CHECKPOINT_EVERY`] rounds; `None` otherwise, and for the RDP
    /// accountant. A restart resumes the ledger's composition from it ([`Restored::ledger_checkpoint`]):
    /// inside a run the rounds after it compose as one, and past it at most `CHECKPOINT_EVERY` rounds
    /// start runs of their own (one convolution each: 0.3 s at 300 rounds of a moving rate). A
    /// checkpoint is the PLD of every run that ended (6.7 MB at 100 such rounds, 16 MB at 300), so it is
    /// not rewritten every round.
    pub fn ledger_checkpoint(&mut self) -> Result<Option<Checkpoint>, CoreError> {
        let Some(l) = &self.ledger else {
            return Ok(None);
        };
        if self
            .checkpointed_at
            .is_some_and(|at| l.entries().len() < at + CHECKPOINT_EVERY)
        {
            return Ok(None);
        }
        if !l.last_starts_run() {
            return Ok(None);
        }
        let checkpoint = l.checkpoint()?;
        if checkpoint.is_some() {
            self.checkpointed_at = Some(l.entries().len());
        }
        Ok(checkpoint)
    }

    /// Whether rounds charge the ledger, and how: `Some(true)` the subsampled Gaussian, `Some(false)` the
    /// devices' discrete Gaussian shares under secure aggregation, `None` no user-level DP.
    fn round_kind(&self) -> Option<bool> {
        match self.cfg.privacy.mode {
            DpPlacement::Off => None,
            DpPlacement::Distributed if self.cfg.secure_aggregation.enabled => Some(false),
            _ => Some(true),
        }
    }

    /// The event a round at `sampling_rate` charges (`eff`: the effective Gaussian multiplier).
    fn round_event(&self, sampling_rate: f64, eff: f64) -> Result<Option<RoundEvent>, CoreError> {
        Ok(match self.round_kind() {
            None => None,
            Some(true) => Some(RoundEvent::Gaussian(DpEvent::new(sampling_rate, eff, 1)?)),
            Some(false) => {
                let p = &self.cfg.privacy;
                let scale = self.cfg.secure_aggregation.encoding(1)?.scale;
                Some(RoundEvent::Ddg(DdgEvent::new(
                    u64::from(p.noise_clients),
                    self.cfg.secagg_noise_steps() as f64,
                    p.clip * scale,
                    self.schema.num_params() as u64,
                    sampling_rate,
                    1,
                )?))
            }
        })
    }

    /// ε after `event` at the configured δ, refused past the budget: the ledger's own accountant while
    /// every round is Gaussian, RDP over integer orders once a discrete Gaussian round is involved.
    fn epsilon_after(&self, event: &RoundEvent) -> Result<f64, CoreError> {
        let Some(l) = &self.ledger else {
            return Err(CoreError::NoLedger);
        };
        let mut gaussian: Vec<DpEvent> = l.entries().iter().map(|e| e.event).collect();
        let mut discrete = self.ddg.clone();
        let eps = match event {
            RoundEvent::Gaussian(e) if discrete.is_empty() => l.preview(*e)?.epsilon,
            RoundEvent::Gaussian(e) => {
                gaussian.push(*e);
                starling_privacy::ddg::epsilon_with(&gaussian, &discrete, l.budget().delta)?.0
            }
            RoundEvent::Ddg(e) => {
                discrete.push(*e);
                starling_privacy::ddg::epsilon_with(&gaussian, &discrete, l.budget().delta)?.0
            }
        };
        let budget = l.budget();
        if eps.is_nan() || eps > budget.epsilon {
            return Err(PrivacyError::BudgetExceeded {
                scope: l.scope().to_string(),
                would_reach: eps,
                delta: budget.delta,
                budget: budget.epsilon,
            }
            .into());
        }
        Ok(eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Action, EngineConfig, RoundPhase, UpdateMeta};
    use starling_protocol::manifest::ManifestVerifier;
    use starling_protocol::message::LocalOptimizer;
    use starling_protocol::{Fingerprint, TensorSpec, UpdateId};

    const LEN: usize = 6;

    fn schema() -> AdapterSchema {
        AdapterSchema::new(vec![TensorSpec {
            name: "t".into(),
            shape: vec![2, 3],
        }])
        .unwrap()
    }

    fn key() -> SigningIdentity {
        SigningIdentity::from_seed([7; 32])
    }

    fn config(mode: DpPlacement, budget: f64) -> CoordinatorConfig {
        let mut cfg = CoordinatorConfig {
            rounds: EngineConfig {
                min_clients: 2,
                min_updates: 2,
                round_timeout_ms: 1000,
                ..EngineConfig::default()
            },
            ..CoordinatorConfig::default()
        };
        cfg.privacy.mode = mode;
        cfg.privacy.noise_multiplier = 1.0;
        cfg.privacy.epsilon_budget = budget;
        cfg
    }

    fn core(cfg: CoordinatorConfig) -> RoundCore {
        let engine =
            Engine::new(cfg.rounds.clone(), schema().hash(), ModelVersion(0), 1, 0).unwrap();
        let key = key();
        RoundCore::new(
            cfg,
            schema(),
            Digest::of(b"base"),
            key,
            engine,
            2,
            Some([3; 32]),
            Restored::default(),
        )
        .unwrap()
    }

    /// Drives the engine through one round with devices 1 and 2 reporting: the round to aggregate.
    fn round(core: &mut RoundCore, start: u64) -> RoundRecord {
        for c in [1u8, 2] {
            core.engine.client_seen(Fingerprint([c; 32]), start);
        }
        let a = core.engine.tick(start);
        let Some(Action::RoundStarted(r)) = a.first() else {
            panic!("{a:?}")
        };
        let r = r.clone();
        for c in [1u8, 2] {
            let m = UpdateMeta {
                update_id: UpdateId([c + start as u8; 16]),
                client: Fingerprint([c; 32]),
                round: r.id,
                model_version: r.model_version,
                schema: schema().hash(),
                num_examples: u64::from(c),
            };
            core.engine.task_request(m.client, start + 1);
            core.engine.check_update(&m, start + 2).unwrap();
            core.engine.record_update(&m, start + 2).unwrap();
        }
        let a = core.engine.tick(start + 3);
        let Some(Action::Aggregate { round, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(round.phase, RoundPhase::Aggregating);
        round.clone()
    }

    fn updates() -> RoundInput {
        RoundInput::Updates {
            deltas: vec![(1, vec![3.0; LEN]), (2, vec![0.0; LEN])],
            loss: 5.0,
        }
    }

    #[test]
    fn a_round_signs_the_weighted_step_on_its_parent_and_commits_in_order() {
        let mut c = core(config(DpPlacement::Off, 10.0));
        let r = round(&mut c, 0);
        let parent = vec![1.0f32; LEN];
        let genesis = Digest::of(b"v0 manifest");
        let p = c.aggregate(&r, &updates(), &parent, genesis, 42).unwrap();
        assert_eq!(p.version, ModelVersion(1));
        // FedAvg by examples: (1·3 + 2·0) / 3 = 1 on top of the parent's 1.
        let values = starling_protocol::update::adapter_values(&p.model.adapter).unwrap();
        assert_eq!(values, vec![2.0; LEN]);
        let m = ManifestVerifier::new(vec![key().public_key()])
            .verify(&p.model.manifest)
            .unwrap();
        assert_eq!(
            (
                m.version,
                m.parent_digest,
                m.round,
                m.created_at_unix_ms,
                m.dp
            ),
            (ModelVersion(1), Some(genesis), r.id, 42, DpRecord::OFF)
        );
        assert_eq!(m.adapter_digest, Digest::of(&p.model.adapter));
        assert_eq!((p.charge.updates, p.charge.mean_train_loss), (2, 2.5));
        assert_eq!(p.charge.epsilon_after, 0.0);
        // Nothing moves until the driver commits; a publication out of order is refused.
        assert_eq!(c.engine.latest(), ModelVersion(0));
        let mut later = p.clone();
        later.version = ModelVersion(2);
        assert!(matches!(
            c.commit(&later),
            Err(CoreError::OutOfOrder { .. })
        ));
        c.commit(&p).unwrap();
        assert_eq!(c.engine.latest(), ModelVersion(1));
    }

    #[test]
    fn the_budget_refuses_a_round_before_it_is_computed_and_charges_only_on_commit() {
        // Central noise, every client sampled: at z = 1 and δ = 1e-6 one round costs ε ≈ 4.9, two ≈ 7.3.
        let mut c = core(config(DpPlacement::Central, 6.0));
        let r = round(&mut c, 0);
        let parent = vec![0.0f32; LEN];
        let first = c
            .aggregate(&r, &updates(), &parent, Digest::of(b"v0"), 1)
            .unwrap();
        let eps1 = first.charge.epsilon_after;
        assert!(eps1 > 4.0 && eps1 <= 6.0, "{eps1}");
        // The preview a driver asks for before serving the round's tasks is the charge, exactly.
        assert_eq!(c.preview_epsilon(&r).unwrap(), Some(eps1));
        assert_eq!(first.charge.sampling_rate, 1.0);
        assert!(first.charge.noise_multiplier > 0.9, "{:?}", first.charge);
        let m = ManifestVerifier::new(vec![key().public_key()])
            .verify(&first.model.manifest)
            .unwrap();
        assert_eq!(m.dp.mode, DpMode::UserCentral);
        assert_eq!(m.dp.epsilon_spent, eps1);
        // Not committed: aggregating the same round again previews the same ε (nothing was charged).
        let again = c
            .aggregate(&r, &updates(), &parent, Digest::of(b"v0"), 1)
            .unwrap();
        assert_eq!(again.charge.epsilon_after, eps1);
        c.commit(&first).unwrap();
        // The second round would pass the budget: its preview says so before any device trains, and
        // aggregating it is refused with the same privacy error.
        let r2 = round(&mut c, 10);
        assert!(
            matches!(
                c.preview_epsilon(&r2),
                Err(CoreError::Privacy(PrivacyError::BudgetExceeded { .. }))
            ),
            "{:?}",
            c.preview_epsilon(&r2)
        );
        let refused = c.aggregate(&r2, &updates(), &parent, first.model.manifest.digest(), 2);
        assert!(matches!(refused, Err(CoreError::Privacy(_))), "{refused:?}");
        // Restarted with the budget lowered below what was spent, the core keeps the round's charge
        // (charging it again against the lowered budget would have dropped it) and refuses the next.
        let cfg = config(DpPlacement::Central, 4.0);
        let engine =
            Engine::new(cfg.rounds.clone(), schema().hash(), ModelVersion(1), 1, 0).unwrap();
        let restarted = RoundCore::new(
            cfg,
            schema(),
            Digest::of(b"base"),
            key(),
            engine,
            2,
            Some([3; 32]),
            Restored {
                charges: vec![(r.id, first.charge)],
                ..Restored::default()
            },
        )
        .unwrap();
        let ledger = restarted.ledger.as_ref().unwrap();
        assert_eq!((ledger.entries().len(), ledger.spent()), (1, eps1));
        assert_eq!(ledger.remaining(), 0.0);
    }

    #[test]
    fn a_restart_resumes_the_ledger_from_its_checkpoint_and_ignores_a_foreign_one() {
        let cfg = config(DpPlacement::Central, 100.0);
        let restarted = |charges: &[(RoundId, RoundCharge)], checkpoint: Option<Checkpoint>| {
            let engine =
                Engine::new(cfg.rounds.clone(), schema().hash(), ModelVersion(0), 1, 0).unwrap();
            let restored = Restored {
                charges: charges.to_vec(),
                ledger_checkpoint: checkpoint,
                ..Restored::default()
            };
            RoundCore::new(
                cfg.clone(),
                schema(),
                Digest::of(b"base"),
                key(),
                engine,
                2,
                Some([3; 32]),
                restored,
            )
            .unwrap()
        };
        // A population that grows: the sampling rate moves every round but two.
        let charges: Vec<(RoundId, RoundCharge)> = [0.01, 0.011, 0.012, 0.012, 0.013, 0.014]
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let charge = RoundCharge {
                    sampling_rate: q,
                    noise_multiplier: 1.0,
                    epsilon_after: f64::NAN,
                    mean_train_loss: 1.0,
                    updates: 2,
                };
                (RoundId(i as u64), charge)
            })
            .collect();
        // As stored: each round with the ε after it.
        let full = restarted(&charges, None);
        let mut charges = charges;
        for ((_, c), e) in charges
            .iter_mut()
            .zip(full.ledger.as_ref().unwrap().entries())
        {
            c.epsilon_after = e.epsilon_after;
        }
        // The driver stores a checkpoint after a round that starts a run, not after one continuing it.
        let at = |n: usize| restarted(&charges[..n], None).ledger_checkpoint().unwrap();
        assert!(at(3).is_some());
        assert!(at(4).is_none(), "round 3 continues round 2's run");
        let cp = at(5).unwrap();
        assert_eq!(cp.events, 5);
        // And not again before CHECKPOINT_EVERY more rounds, each starting a run of its own.
        let mut live = restarted(&charges[..5], None);
        assert!(live.ledger_checkpoint().unwrap().is_some());
        for i in 0..CHECKPOINT_EVERY {
            let e = DpEvent::new(0.02 + i as f64 * 1e-3, 1.0, 1).unwrap();
            live.ledger.as_mut().unwrap().record("round", e).unwrap();
            let due = live.ledger_checkpoint().unwrap();
            assert_eq!(due.is_some(), i + 1 == CHECKPOINT_EVERY, "{i}");
        }
        // A restart two rounds later resumes from it: the same ledger as composing every round again.
        let resumed = restarted(&charges, Some(cp.clone()));
        let entries = |c: &RoundCore| c.ledger.as_ref().unwrap().entries().to_vec();
        assert_eq!(entries(&resumed), entries(&full));
        assert!(full.ledger.as_ref().unwrap().spent() > 0.0);
        // A checkpoint taken on other rounds (a store restored from an older backup) is not used.
        let mut foreign = cp;
        foreign.events_hash ^= 1;
        assert_eq!(entries(&restarted(&charges, Some(foreign))), entries(&full));
    }

    #[test]
    fn the_task_says_what_the_configuration_says_about_privacy() {
        let manifest = |c: &RoundCore| {
            Manifest {
                version: ModelVersion(0),
                parent_digest: None,
                base_digest: Digest::of(b"base"),
                adapter_digest: Digest::of(b"a"),
                adapter_schema: schema(),
                round: RoundId(0),
                strategy: "init".into(),
                dp: DpRecord::OFF,
                created_at_unix_ms: 0,
            }
            .sign(&c.signing)
        };
        let off = core(config(DpPlacement::Off, 10.0));
        let t = off.task(RoundId(4), manifest(&off), 99, None);
        assert_eq!((t.round, t.deadline_unix_ms), (RoundId(4), 99));
        assert_eq!(t.dp, DpTask::OFF);
        assert_eq!(t.params.optimizer, LocalOptimizer::AdamW);
        let mut cfg = config(DpPlacement::Off, 10.0);
        cfg.task.optimizer = LocalOptimizer::Sgd;
        let sgd = core(cfg);
        let t = sgd.task(RoundId(4), manifest(&sgd), 99, None);
        assert_eq!(t.params.optimizer, LocalOptimizer::Sgd);
        let mut cfg = config(DpPlacement::Distributed, 10.0);
        cfg.privacy.noise_clients = 3;
        cfg.task.dp_sgd_noise_multiplier = 0.5;
        let dist = core(cfg);
        let t = dist.task(RoundId(1), manifest(&dist), 5, None);
        assert_eq!(
            t.dp.user,
            Some(UserDp::ClipAndNoise {
                clip: 1.0,
                noise_multiplier: 1.0,
                clients: 3
            })
        );
        assert_eq!(t.dp.dp_sgd.map(|d| d.noise_multiplier), Some(0.5));
        let central = core(config(DpPlacement::Central, 10.0));
        let t = central.task(RoundId(1), manifest(&central), 5, None);
        assert_eq!(t.dp.user, Some(UserDp::Clip { clip: 1.0 }));
    }

    /// Six deltas (examples, values, training loss), some far past a clip bound of 1.
    fn six() -> Vec<(u64, Vec<f32>, f32)> {
        (0..6u64)
            .map(|i| {
                let d = (0..LEN)
                    .map(|j| ((i * 7 + j as u64 * 3) % 11) as f32 * 0.1 - 0.4)
                    .collect();
                (i + 1, d, i as f32)
            })
            .collect()
    }

    /// The published adapter of one round over `six()`: flat (every delta at the root), or through two
    /// edge aggregators' partial sums of three devices each.
    fn publish(cfg: CoordinatorConfig, hierarchical: bool) -> Vec<f32> {
        let mut c = core(cfg);
        let r = round(&mut c, 0);
        let six = six();
        let input = if hierarchical {
            let partials: Vec<PartialSum> = six
                .chunks(3)
                .map(|cohort| {
                    let ups: Vec<(ClientUpdate<'_>, f32)> = cohort
                        .iter()
                        .map(|(n, d, l)| {
                            (
                                ClientUpdate {
                                    num_examples: *n,
                                    delta: d,
                                },
                                *l,
                            )
                        })
                        .collect();
                    c.partial_sum(&ups).unwrap()
                })
                .collect();
            assert_eq!(partials.iter().map(|p| p.count).sum::<usize>(), 6);
            RoundInput::from_partials(&partials, LEN).unwrap()
        } else {
            RoundInput::Updates {
                deltas: six.iter().map(|(n, d, _)| (*n, d.clone())).collect(),
                loss: six.iter().map(|(_, _, l)| f64::from(*l)).sum(),
            }
        };
        let p = c
            .aggregate(&r, &input, &[0.5; LEN], Digest::of(b"v0"), 1)
            .unwrap();
        assert_eq!((p.charge.updates, p.charge.mean_train_loss), (6, 2.5));
        starling_protocol::update::adapter_values(&p.model.adapter).unwrap()
    }

    #[test]
    fn partial_sums_of_edge_aggregators_give_the_flat_round() {
        for mode in [DpPlacement::Off, DpPlacement::Central] {
            let flat = publish(config(mode, 100.0), false);
            let tree = publish(config(mode, 100.0), true);
            for (f, t) in flat.iter().zip(&tree) {
                assert!(
                    (f - t).abs() <= 1e-6 * f.abs().max(1.0),
                    "{mode:?}: {flat:?} vs {tree:?}"
                );
            }
            assert_ne!(
                flat,
                vec![0.5; LEN],
                "{mode:?}: the round moved the adapter"
            );
        }
    }

    #[test]
    fn partial_sums_add_up_in_fours_and_remainders_over_every_chunk_edge() {
        for (k, len) in [(1, 3), (4, 16 * 1024), (7, 16 * 1024 + 5), (9, 40_000)] {
            let vs: Vec<Vec<f32>> = (0..k)
                .map(|v| {
                    (0..len)
                        .map(|i| ((i * 13 + v * 7) % 101) as f32 * 0.01 - 0.5)
                        .collect()
                })
                .collect();
            let views: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
            let got = sum_of(&views, len);
            for (i, g) in got.iter().enumerate() {
                let want: f64 = vs.iter().map(|v| f64::from(v[i])).sum();
                assert!(
                    (f64::from(*g) - want).abs() < 1e-5,
                    "k {k} len {len} at {i}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rules_that_need_every_update_refuse_partial_sums_and_lengths_must_agree() {
        let mut cfg = config(DpPlacement::Off, 10.0);
        cfg.strategy.kind = crate::strategy::StrategyKind::Median;
        let c = core(cfg);
        let d = vec![0.0f32; LEN];
        let ups = [(
            ClientUpdate {
                num_examples: 1,
                delta: &d,
            },
            0.0,
        )];
        let e = c.partial_sum(&ups).unwrap_err();
        assert!(e.to_string().contains("not in hierarchical mode"), "{e}");
        let short = PartialSum {
            sum: vec![0.0; LEN - 1],
            count: 1,
            weight: 1.0,
            loss: 0.0,
        };
        assert!(matches!(
            RoundInput::from_partials(&[short], LEN),
            Err(CoreError::PartialLength {
                expected: 6,
                found: 5
            })
        ));
    }

    #[test]
    fn a_parent_of_the_wrong_length_is_refused() {
        let mut c = core(config(DpPlacement::Off, 10.0));
        let r = round(&mut c, 0);
        let e = c.aggregate(&r, &updates(), &[0.0; 5], Digest::of(b"v0"), 1);
        assert!(
            matches!(
                e,
                Err(CoreError::AdapterLength {
                    expected: 6,
                    found: 5
                })
            ),
            "{e:?}"
        );
    }
}
