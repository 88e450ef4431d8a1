//! The baselines a run is compared with: the base model, centralized LoRA on the union of the clients'
//! data, and local-only training of a sample of clients, each through the device's own training path with
//! the coordinator's task (no DP). What must never live here: the federation itself.

use super::*;

/// How a baseline trains: optimizer steps, sequences per step, update rule, learning rate.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    steps: u32,
    batch_size: u32,
    optimizer: LocalOptimizer,
    learning_rate: f32,
}

/// Trains LoRA from `start` on `tokens` on `schedule` with the task's other settings (the baseline
/// task: no DP), through the device's own training path; returns the trained adapter's values.
fn train_alone(
    scen: &Scenario,
    model: &Llama,
    task_of: &Task,
    start: &[f32],
    tokens: &[u32],
    schedule: Schedule,
    seed: u64,
) -> Result<Vec<f32>, SimError> {
    let manifest = starling_coordinator::store::manifest_body(&task_of.manifest)?;
    let mut task = task_of.clone();
    task.params.local_steps = schedule.steps;
    task.params.batch_size = schedule.batch_size;
    task.params.learning_rate = schedule.learning_rate;
    task.params.optimizer = schedule.optimizer;
    let t = TaskTraining {
        model,
        task: &task,
        manifest: &manifest,
        start,
        tokens,
        dp_sampling_rate: None,
        seed: Some(seed),
        precision: scen.simulation.precision,
    };
    let trained = train_task(&t, |_, _| true)?;
    let delta = decode_update(
        &trained.body,
        &manifest.adapter_schema,
        &UpdateLimits::default(),
    )?;
    Ok(start.iter().zip(&delta).map(|(a, d)| a + d).collect())
}

/// The task the coordinator would send for version 0 (built by the coordinator's one Task builder), with
/// no DP and f32 deltas: the baselines train with its settings.
fn baseline_task(coord: &Coordinator) -> Result<Task, SimError> {
    let v0 = coord
        .store()
        .model(ModelVersion(0))?
        .ok_or(SimError::VersionMissing(0))?;
    let mut task = starling_coordinator::round_core::task(
        coord.config(),
        starling_protocol::RoundId(0),
        v0.manifest,
        u64::MAX,
        0.0,
        None,
    );
    task.dp = starling_protocol::message::DpTask::OFF;
    task.encoding = Encoding::F32;
    task.max_update_bytes = u64::MAX;
    Ok(task)
}

pub(super) fn baselines(
    scen: &Scenario,
    l: &Loaded,
    evalset: &EvalSet,
    eval_clients: &[usize],
    final_adapter: &[f32],
    coord: &Coordinator,
) -> Result<Baselines, SimError> {
    let seed = scen.simulation.seed;
    let task = baseline_task(coord)?;
    let start = v0_adapter(coord)?;
    let union = l
        .data
        .encode(&l.data.union_train(), &l.tok, l.chat.as_ref())?;
    // Centralized: one run per learning rate from the same start and seed; the most accurate is reported.
    let plan = scen.baselines.centralized(scen);
    let mut tries = Vec::with_capacity(plan.learning_rates.len());
    for &lr in &plan.learning_rates {
        let central = train_alone(
            scen,
            &l.model,
            &task,
            &start,
            &union,
            Schedule {
                steps: plan.steps,
                batch_size: plan.batch_size,
                optimizer: plan.optimizer,
                learning_rate: lr,
            },
            derive(seed, "central", 0, 0),
        )?;
        let scores = evaluate(
            &l.model,
            Some(&adapter_from(&l.model, scen, &central)?),
            evalset,
        )?;
        tries.push(CentralizedTry {
            learning_rate: lr,
            scores,
        });
    }
    // The most accurate try (the first of equals); its loss is reported with it.
    let best = tries
        .iter()
        .reduce(|b, t| {
            if t.scores.accuracy > b.scores.accuracy {
                t
            } else {
                b
            }
        })
        .cloned()
        .ok_or_else(|| SimError::Scenario("baselines: no centralized learning rate".into()))?;
    // Local-only training runs the federation's schedule: rounds × local steps at the task's settings.
    let alone_schedule = Schedule {
        steps: scen.federation_steps(),
        batch_size: scen.task.batch_size,
        optimizer: scen.task.optimizer,
        learning_rate: scen.task.learning_rate,
    };
    // Local-only: a seeded sample of the evaluated clients, each trained alone for the same steps.
    let mut sample: Vec<usize> = eval_clients.to_vec();
    sample.shuffle(&mut ChaCha8Rng::seed_from_u64(derive(
        seed,
        "local-only",
        0,
        0,
    )));
    let mut picked = Vec::new();
    let (mut lo, mut fed, mut base) = (Acc::default(), Acc::default(), Acc::default());
    let fed_adapter = adapter_from(&l.model, scen, final_adapter)?;
    let base_adapter = adapter_from(&l.model, scen, &start)?;
    for c in sample {
        if picked.len() >= scen.baselines.local_only_clients {
            break;
        }
        let own = evalset.of_client(c);
        let tokens = l.data.encode(l.data.train(c), &l.tok, l.chat.as_ref())?;
        if own.windows.is_empty() || tokens.len() <= scen.task.seq_len as usize {
            continue;
        }
        picked.push(c);
        let alone = train_alone(
            scen,
            &l.model,
            &task,
            &start,
            &tokens,
            alone_schedule,
            derive(seed, "alone", c as u64, 0),
        )?;
        lo.add(evaluate(
            &l.model,
            Some(&adapter_from(&l.model, scen, &alone)?),
            &own,
        )?);
        fed.add(evaluate(&l.model, Some(&fed_adapter), &own)?);
        base.add(evaluate(&l.model, Some(&base_adapter), &own)?);
    }
    Ok(Baselines {
        centralized: best.scores,
        centralized_steps: u64::from(plan.steps),
        centralized_batch_size: plan.batch_size,
        centralized_optimizer: plan.optimizer,
        centralized_learning_rate: best.learning_rate,
        centralized_tries: tries,
        local_only: lo.scores(),
        federated_on_local_clients: fed.scores(),
        base_on_local_clients: base.scores(),
        local_only_clients: picked.len(),
    })
}

/// Token-weighted mean of several [`Scores`].
#[derive(Default)]
struct Acc {
    loss: f64,
    correct: f64,
    tokens: u64,
}

impl Acc {
    fn add(&mut self, s: Scores) {
        self.loss += s.loss * s.tokens as f64;
        self.correct += s.accuracy * s.tokens as f64;
        self.tokens += s.tokens;
    }

    fn scores(&self) -> Scores {
        if self.tokens == 0 {
            return Scores::default();
        }
        let loss = self.loss / self.tokens as f64;
        Scores {
            loss,
            perplexity: loss.exp(),
            accuracy: self.correct / self.tokens as f64,
            tokens: self.tokens,
        }
    }
}
