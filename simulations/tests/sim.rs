//! The simulator end to end on small scenarios: the real coordinator and device sessions, real training on
//! the shipped model, in memory and over QUIC on loopback.

use starling_model::Llama;
use starling_privacy::ddg::{self, DdgEvent};
use starling_privacy::{accountant, AccountantKind, DpEvent, GaussianMechanism};
use starling_simulations::sim::scenario::{AttackKind, Scenario};
use starling_simulations::sim::{self, Outcome, RunOptions, Transport};

/// A small scenario: 16 LEAF roles, 4 per round, 3 rounds of 3 local steps on 64-token sequences.
fn small(extra: &str) -> Scenario {
    small_with("round_timeout_ms = 60000", extra)
}

/// [`small`] with `rounds` as the body of its `[rounds]` table.
fn small_with(rounds: &str, extra: &str) -> Scenario {
    let text = format!(
        r#"
[simulation]
name = "small"
seed = 5
rounds = 3
clients_per_round = 4

[data]
clients = 16

[evaluation]
clients = 8
windows_per_client = 1
seq_len = 64

[rounds]
{rounds}

[task]
local_steps = 3
batch_size = 4
seq_len = 64
learning_rate = 0.004

[adapter]
rank = 4
targets = ["q", "v"]
{extra}
"#
    );
    Scenario::parse(&text, "test scenario").unwrap()
}

fn run(s: &Scenario, transport: Transport) -> Outcome {
    sim::run(
        s,
        &RunOptions {
            transport,
            ..RunOptions::default()
        },
    )
    .unwrap()
}

fn without_wall_time(o: &Outcome) -> Vec<String> {
    o.rounds
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.wall_s = 0.0;
            serde_json::to_string(&r).unwrap()
        })
        .collect()
}

#[test]
fn same_scenario_and_seed_give_the_same_metrics_and_models() {
    let s = small("");
    let (a, b) = (run(&s, Transport::Memory), run(&s, Transport::Memory));
    assert_eq!(a.summary.rounds, 3);
    assert_eq!(without_wall_time(&a), without_wall_time(&b));
    assert_eq!(a.summary.adapter_digests, b.summary.adapter_digests);
    assert_eq!(a.summary.adapter_digests.len(), 4, "v0 and three rounds");
    // Every round aggregated what its selected clients sent, and the model moved.
    for r in &a.rounds[1..] {
        assert_eq!(r.participants, 4, "{r:?}");
        assert!(r.bytes_up > 0 && r.bytes_down > 0);
    }
    assert_ne!(a.summary.adapter_digests[0], a.summary.adapter_digests[3]);
    // Another seed is another run.
    let mut other = s.clone();
    other.simulation.seed = 6;
    assert_ne!(
        run(&other, Transport::Memory).summary.adapter_digests,
        a.summary.adapter_digests
    );
}

#[test]
fn quic_and_memory_paths_publish_the_same_adapters() {
    let s = small("");
    let mem = run(&s, Transport::Memory);
    let quic = run(&s, Transport::Quic);
    assert_eq!(mem.summary.adapter_digests, quic.summary.adapter_digests);
    assert_eq!(without_wall_time(&mem), without_wall_time(&quic));
}

/// `[simulation] precision = "bf16"`: the clients train through the bf16 products where the CPU has
/// AVX512-BF16 — other adapters, the same learning within bf16's rounding — and exactly as f32
/// elsewhere.
#[test]
fn bf16_clients_learn_what_f32_clients_learn() {
    let f32_run = run(&small(""), Transport::Memory);
    let mut s = small("");
    s.simulation.precision = starling_model::engine::Precision::Bf16;
    let bf16_run = run(&s, Transport::Memory);
    let loss = |o: &Outcome, i: usize| o.rounds[i].test_loss.unwrap();
    let (first, last) = (0, f32_run.rounds.len() - 1);
    assert!(loss(&f32_run, last) < loss(&f32_run, first));
    assert_eq!(loss(&bf16_run, first), loss(&f32_run, first), "same base");
    let (a, b) = (loss(&f32_run, last), loss(&bf16_run, last));
    if starling_model::bf16::available() {
        assert_ne!(
            f32_run.summary.adapter_digests[last], bf16_run.summary.adapter_digests[last],
            "bf16 products ran"
        );
        assert!(
            (a - b).abs() < 1e-2 * a,
            "final test loss: f32 {a}, bf16 {b}"
        );
    } else {
        assert_eq!(
            f32_run.summary.adapter_digests,
            bf16_run.summary.adapter_digests
        );
    }
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn a_robust_strategy_resists_sign_flipping_attackers_better_than_fedavg() {
    // 20 roles, 10 a round, 5 local steps: 4 devices (20%) send −4× their honest delta.
    let base = |extra: &str| {
        let mut s = small(extra);
        s.data.clients = 20;
        s.simulation.clients_per_round = sim::scenario::PerRound::Count(10);
        s.task.local_steps = 5;
        s.task.learning_rate = 0.01;
        s
    };
    let attack = r#"
[attack]
fraction = 0.2
kind = "sign-flip"
scale = 4.0
"#;
    let clean = run(&base(""), Transport::Memory);
    let fedavg = run(&base(attack), Transport::Memory);
    let robust = run(
        &base(&format!(
            "{attack}\n[strategy]\nkind = \"trimmed-mean\"\ntrim_beta = 0.2\n"
        )),
        Transport::Memory,
    );
    assert_eq!(fedavg.summary.attackers, 4);
    assert_eq!(base(attack).attack.kind, AttackKind::SignFlip);
    let loss = |o: &Outcome| o.summary.final_scores.loss;
    let (gap_fedavg, gap_robust) = (
        (loss(&fedavg) - loss(&clean)).abs(),
        (loss(&robust) - loss(&clean)).abs(),
    );
    assert!(
        gap_robust < gap_fedavg,
        "test loss: clean {}, FedAvg attacked {}, trimmed mean attacked {}",
        loss(&clean),
        loss(&fedavg),
        loss(&robust)
    );
    // The attack hurts plain averaging: its model is worse than the clean one.
    assert!(loss(&fedavg) > loss(&clean));
    let (d_fedavg, d_robust) = (
        distance(&fedavg.final_adapter, &clean.final_adapter),
        distance(&robust.final_adapter, &clean.final_adapter),
    );
    eprintln!("adapter distance from the clean run: FedAvg {d_fedavg}, trimmed mean {d_robust}");
}

/// `[topology] aggregators = 2`: the same eight devices behind two real edge aggregators (four each) in
/// front of the root in hierarchical mode publish what the flat federation publishes, up to float
/// summation order — every device takes part in every round either way.
#[test]
fn devices_behind_two_edge_aggregators_publish_what_the_flat_federation_publishes() {
    let everyone = |extra: &str| {
        let mut s = small(extra);
        s.data.clients = 8;
        s.simulation.clients_per_round = sim::scenario::PerRound::Count(8);
        s.rounds.min_updates = 8;
        s
    };
    let flat = run(&everyone(""), Transport::Memory);
    let tree = run(
        &everyone("[topology]\naggregators = 2\nquiet_ms = 600000\n"),
        Transport::Memory,
    );
    assert_eq!(tree.summary.rounds, 3);
    for (a, b) in flat.rounds.iter().zip(&tree.rounds).skip(1) {
        assert_eq!(b.participants, 8, "eight devices in round {}", b.round);
        assert_eq!(a.participants, b.participants);
        let (x, y) = (a.test_loss.unwrap(), b.test_loss.unwrap());
        assert!((x - y).abs() < 1e-5 * x, "round {}: {x} vs {y}", a.round);
    }
    let worst = flat
        .final_adapter
        .iter()
        .zip(&tree.final_adapter)
        .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
        .fold(0f32, f32::max);
    eprintln!("{{\"probe\":\"sim-topology\",\"max_rel_diff\":{worst:e}}}");
    assert!(worst < 1e-4, "flat and hierarchical differ by {worst}");
    // A slow link from the aggregators to the root: the same models (the run is reproducible), later
    // (each partial sum of the adapter's f32 values takes bytes / 12.5 kB/s to arrive).
    let slow = run(
        &everyone("[topology]\naggregators = 2\nquiet_ms = 600000\nuplink_mbps = 0.1\n"),
        Transport::Memory,
    );
    assert_eq!(slow.summary.adapter_digests, tree.summary.adapter_digests);
    let transfer_s = tree.final_adapter.len() as f64 * 4.0 / 12_500.0;
    eprintln!(
        "simulated time: uplink 100 Mbit/s {} s, 0.1 Mbit/s {} s (a partial sum: {transfer_s:.1} s)",
        tree.summary.sim_time_s, slow.summary.sim_time_s
    );
    assert!(
        slow.summary.sim_time_s >= tree.summary.sim_time_s + 3.0 * transfer_s,
        "three rounds, each waiting for its partial sums on the slow link"
    );
    // With secure aggregation: SecAgg+ at each aggregator for its four devices, the same integer
    // encodings as a flat secure round of the eight (masked weights: FedAvg's example weights), decoded
    // as two sums instead of one.
    let secure =
        "[secure_aggregation]\nenabled = true\nclip = 0.05\nvalue_bits = 24\nweight_cap = 5000\n";
    let flat_secure = run(&everyone(secure), Transport::Memory);
    let mut tree_secure = everyone(secure);
    tree_secure.topology.aggregators = 2;
    tree_secure.topology.quiet_ms = 600_000;
    let tree_secure = run(&tree_secure, Transport::Memory);
    assert_eq!(tree_secure.summary.rounds, 3, "{:?}", tree_secure.rounds);
    for r in &tree_secure.rounds[1..] {
        assert_eq!(r.participants, 8, "{r:?}");
    }
    let worst = flat_secure
        .final_adapter
        .iter()
        .zip(&tree_secure.final_adapter)
        .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
        .fold(0f32, f32::max);
    eprintln!("{{\"probe\":\"sim-topology-secure\",\"max_rel_diff\":{worst:e}}}");
    assert!(
        worst < 1e-4,
        "flat and hierarchical secure runs differ by {worst}"
    );
    // The rotated encoding per cohort: each aggregator's scale is sized for its four devices. Its
    // resolution is relative to the bound (the weighted delta and weight value, √2 · clip), and weights
    // far below the cap leave these vectors at about 1% of it: 31 bits keep the rounding out of sight.
    let mut tree_rotated = everyone(
        "[secure_aggregation]\nenabled = true\nencoding = \"rotated\"\nclip = 1.0\n\
         modulus_bits = 31\nweight_cap = 5000\n",
    );
    tree_rotated.topology.aggregators = 2;
    tree_rotated.topology.quiet_ms = 600_000;
    let tree_rotated = run(&tree_rotated, Transport::Memory);
    let worst = |a: &[f32]| {
        a.iter()
            .zip(&tree_rotated.final_adapter)
            .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
            .fold(0f32, f32::max)
    };
    let (vs_secure, vs_tree) = (
        worst(&flat_secure.final_adapter),
        worst(&tree.final_adapter),
    );
    eprintln!("{{\"probe\":\"sim-topology-rotated\",\"vs_flat_secure\":{vs_secure:e},\"vs_tree\":{vs_tree:e}}}");
    assert!(
        vs_secure < 1e-4 && vs_tree < 1e-4,
        "rotated cohorts: {vs_secure} {vs_tree}"
    );
    // Not over QUIC, and not more aggregators than devices a round.
    let err = sim::run(
        &everyone("[topology]\naggregators = 2\n"),
        &RunOptions {
            transport: Transport::Quic,
            ..RunOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("in-memory"), "{err}");
    let mut nine = everyone("");
    nine.topology.aggregators = 9;
    let err = sim::run(&nine, &RunOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("every aggregator needs a device"),
        "{err}"
    );
}

/// Colluders sending one shared vector (the last step reversed): Krum, which rewards updates that sit
/// close together, picks theirs — round 2 undoes round 1 and the model is back at its base — while the
/// trimmed mean cuts them away and learns.
#[test]
fn colluders_steer_krum_back_to_the_base_model_and_the_trimmed_mean_resists() {
    let base = |extra: &str| {
        let mut s = small(&format!(
            "[attack]\nfraction = 0.2\nkind = \"collude\"\nscale = 1.0\n{extra}"
        ));
        s.simulation.rounds = 2;
        s.data.clients = 20;
        s.simulation.clients_per_round = sim::scenario::PerRound::Count(20);
        s.task.local_steps = 5;
        s.task.learning_rate = 0.01;
        s
    };
    let krum = run(
        &base("[strategy]\nkind = \"krum\"\nbyzantine = 4\n"),
        Transport::Memory,
    );
    let trimmed = run(
        &base("[strategy]\nkind = \"trimmed-mean\"\ntrim_beta = 0.2\n"),
        Transport::Memory,
    );
    assert_eq!(krum.summary.attackers, 4);
    let loss = |o: &Outcome, r: usize| o.rounds[r].test_loss.unwrap();
    eprintln!(
        "test loss by round: krum {:?}, trimmed mean {:?}",
        (0..3).map(|r| loss(&krum, r)).collect::<Vec<_>>(),
        (0..3).map(|r| loss(&trimmed, r)).collect::<Vec<_>>()
    );
    assert!(
        (loss(&krum, 2) - loss(&krum, 0)).abs() < 1e-4 * loss(&krum, 0),
        "Krum took the colluders' vector: round 2 undid round 1"
    );
    assert!((loss(&krum, 1) - loss(&krum, 0)).abs() > 1e-3);
    assert!(
        loss(&trimmed, 2) < loss(&trimmed, 0),
        "the trimmed mean learns under the same attack"
    );
}

/// The small scenario with 30% of the selected devices dropping out (before training or before upload),
/// 6 a round of which 2 suffice.
fn with_dropouts() -> Scenario {
    let mut s = small(
        r#"
[devices]
dropout = 0.3
offline_ms = 120000
"#,
    );
    s.simulation.clients_per_round = sim::scenario::PerRound::Count(6);
    s.rounds.min_updates = 2;
    s
}

#[test]
fn training_ahead_on_workers_changes_nothing_in_the_results() {
    // Dropouts (before training and before upload) leave trainings started and never taken.
    let s = with_dropouts();
    let with = |workers| {
        let opts = RunOptions {
            train_workers: Some(workers),
            ..RunOptions::default()
        };
        sim::run(&s, &opts).unwrap()
    };
    let (inline, ahead) = (with(0), with(3));
    assert_eq!(inline.summary.rounds, 3);
    assert!(inline.rounds.iter().map(|r| r.dropouts).sum::<usize>() > 0);
    assert_eq!(without_wall_time(&inline), without_wall_time(&ahead));
    assert_eq!(
        inline.summary.adapter_digests,
        ahead.summary.adapter_digests
    );
}

#[test]
fn rounds_complete_with_thirty_percent_dropouts() {
    let s = with_dropouts();
    let o = run(&s, Transport::Memory);
    assert_eq!(o.summary.rounds, 3, "{:?}", o.rounds);
    let dropped: usize = o.rounds.iter().map(|r| r.dropouts).sum();
    assert!(dropped > 0, "some selected devices dropped out");
    for r in &o.rounds[1..] {
        assert!(r.participants >= 2 && r.participants <= 6, "{r:?}");
    }
}

#[test]
fn a_dp_run_spends_exactly_the_accountants_epsilon() {
    let s = small(
        r#"
[privacy]
mode = "central"
clip = 0.05
noise_multiplier = 0.8
delta = 1e-5
epsilon_budget = 1000.0
accountant = "pld"
"#,
    );
    let work = tempfile::tempdir().unwrap();
    let coordinator_dir = work.path().join("coordinator");
    let opts = RunOptions {
        work_dir: Some(coordinator_dir.clone()),
        ..RunOptions::default()
    };
    let o = sim::run(&s, &opts).unwrap();
    assert_eq!(o.summary.rounds, 3);
    // The coordinator stored its ledger's checkpoint when the first round started the run; a restart
    // resumes from it to the same ε.
    let layout = starling_coordinator::service::Layout::new(&coordinator_dir);
    let store = starling_coordinator::store::Store::open(&layout.store()).unwrap();
    let checkpoint = store.ledger_checkpoint().unwrap().unwrap();
    assert_eq!((checkpoint.events, checkpoint.run.unwrap().steps), (1, 1));
    let entries: Vec<starling_privacy::LedgerEntry> = store
        .ledger()
        .unwrap()
        .iter()
        .map(|(r, c)| starling_privacy::LedgerEntry {
            label: format!("round {}", r.0),
            event: DpEvent::new(c.sampling_rate, c.noise_multiplier, 1).unwrap(),
            epsilon_after: c.epsilon_after,
        })
        .collect();
    let budget = starling_privacy::Budget {
        epsilon: 1000.0,
        delta: 1e-5,
    };
    let scope = starling_privacy::LedgerScope::Global;
    let resumed = starling_privacy::Ledger::resume(
        scope,
        budget,
        AccountantKind::Pld,
        entries,
        Some(&checkpoint),
    )
    .unwrap();
    assert_eq!(resumed.spent(), o.summary.epsilon_user);
    let dir = starling_simulations::sim::scenario::resolve(&s.simulation.base_model, None);
    let model = Llama::load(&dir, None, &starling_model::Backend::default().device()).unwrap();
    let n = sim::adapter_params(&model, &s).unwrap();
    let eff = GaussianMechanism::with_multiplier(0.05, 0.8, n)
        .unwrap()
        .effective_noise_multiplier();
    let q = 4.0 / 16.0;
    let expected = accountant::epsilon(
        &[DpEvent::new(q, eff, 3).unwrap()],
        1e-5,
        AccountantKind::Pld,
    )
    .unwrap()
    .epsilon;
    let got = o.summary.epsilon_user;
    assert!(
        (got - expected).abs() <= 1e-9 * expected,
        "ε {got} vs accountant {expected}"
    );
    // Rounds' ε grows monotonically to it.
    let eps: Vec<f64> = o.rounds.iter().map(|r| r.epsilon_user).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
}

#[test]
fn a_target_epsilon_is_met_and_not_exceeded() {
    let s = small(
        r#"
[privacy]
mode = "central"
clip = 0.05
delta = 1e-5
"#,
    );
    let mut s = s;
    s.simulation.target_epsilon = Some(4.0);
    let o = run(&s, Transport::Memory);
    assert_eq!(o.summary.rounds, 3);
    let eps = o.summary.epsilon_user;
    assert!(eps <= 4.0 && eps > 3.9, "ε {eps} for a target of 4");
}

#[test]
fn shipped_scenarios_parse_and_bad_ones_are_refused_clearly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 5);
    Scenario::default_scenario().unwrap();
    let typo = Scenario::parse("[simulation]\nrounds = 3\nround = 4\n", "typo.toml").unwrap_err();
    assert!(typo.to_string().contains("round"), "{typo}");
    let bad = Scenario::parse("[simulation]\nclients_per_round = 0\n", "bad.toml").unwrap_err();
    assert!(bad.to_string().contains("clients_per_round"), "{bad}");
    let dp = Scenario::parse("[simulation]\ntarget_epsilon = 8.0\n", "dp.toml").unwrap_err();
    assert!(dp.to_string().contains("privacy"), "{dp}");
    for (table, names) in [
        (
            "centralized_learning_rates = [0.0]",
            "centralized_learning_rates",
        ),
        (
            "centralized_learning_rates = [1e-3, inf]",
            "centralized_learning_rates",
        ),
        ("centralized_batch_size = 0", "centralized_batch_size"),
        ("centralized_steps = 0", "centralized_steps"),
    ] {
        let e = Scenario::parse(&format!("[simulation]\n[baselines]\n{table}\n"), "b.toml")
            .unwrap_err();
        assert!(e.to_string().contains(names), "{table}: {e}");
    }
}

/// A round the privacy budget cannot pay for never starts (its devices would train for a round that is
/// then refused, and so would every later one's): the coordinator pauses rounds, and the simulator stops
/// with the reason instead of starting rounds until it gives up.
#[test]
fn a_round_past_the_privacy_budget_stops_the_run_with_the_reason() {
    for privacy in [
        "[privacy]\nmode = \"central\"\nclip = 0.5\nnoise_multiplier = 1.0\nepsilon_budget = 0.01\n",
        // Clipping without noise: ε is unbounded.
        "[privacy]\nmode = \"central\"\nclip = 0.5\nnoise_multiplier = 0.0\n",
    ] {
        let err = sim::run(&small(privacy), &RunOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, sim::SimError::BudgetSpent(_)),
            "{privacy}: {text}"
        );
        assert!(text.contains("round 1 not started"), "{text}");
        assert!(text.contains("epsilon_budget"), "{text}");
    }
}

/// `--baselines` trains one centralized model per listed learning rate on its own schedule and reports
/// the most accurate; the gap closed is measured against that one.
#[test]
fn the_centralized_baseline_tries_each_learning_rate_and_reports_the_best() {
    let mut s = small(
        "[baselines]\nlocal_only_clients = 1\ncentralized_steps = 8\ncentralized_batch_size = 2\n\
         centralized_learning_rates = [1e-5, 0.01]\n",
    );
    s.simulation.rounds = 1;
    let o = sim::run(
        &s,
        &RunOptions {
            baselines: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let b = o.summary.baselines.as_ref().unwrap();
    assert_eq!((b.centralized_steps, b.centralized_batch_size), (8, 2));
    // The task's update rule unless `centralized_optimizer` names another.
    assert_eq!(
        b.centralized_optimizer,
        starling_protocol::message::LocalOptimizer::AdamW
    );
    let lrs: Vec<f32> = b
        .centralized_tries
        .iter()
        .map(|t| t.learning_rate)
        .collect();
    assert_eq!(lrs, [1e-5, 0.01]);
    let (slow, fast) = (
        &b.centralized_tries[0].scores,
        &b.centralized_tries[1].scores,
    );
    // Both trained from the base adapter: the tiny rate barely moves it, the other one moves it (here,
    // on 16 roles' few kilobytes, past the best: the larger rate is not the better one).
    let base = o.summary.base.loss;
    assert!(
        (slow.loss - base).abs() * 10.0 < (fast.loss - base).abs(),
        "{slow:?} {fast:?} base {base}"
    );
    let reported = b
        .centralized_tries
        .iter()
        .find(|t| t.learning_rate == b.centralized_learning_rate)
        .unwrap();
    assert_eq!(b.centralized, reported.scores);
    assert!(b
        .centralized_tries
        .iter()
        .all(|t| t.scores.accuracy <= b.centralized.accuracy));
    let gap = b.centralized.accuracy - o.summary.base.accuracy;
    if gap > 0.0 {
        let closed = (o.summary.final_scores.accuracy - o.summary.base.accuracy) / gap;
        assert_eq!(o.summary.gap_closed, Some(closed));
    } else {
        assert_eq!(o.summary.gap_closed, None);
    }
    assert_eq!(b.local_only_clients, 1);
}

#[test]
fn a_secure_federation_publishes_what_the_clear_one_does_up_to_the_encoding() {
    // 6 devices a round (k = 3·log₂ 6 ≈ 8, capped at the 5 others: a complete graph, t = 3), one round
    // from the same model. The weight cap (5,000 sequences) is above every device's example count, so
    // the masked weights are FedAvg's example weights; 24 bits per clip put the encoding's rounding far
    // below the step.
    let base = |extra: &str| {
        let mut s = small(extra);
        s.simulation.clients_per_round = sim::scenario::PerRound::Count(6);
        s.simulation.rounds = 1;
        s
    };
    let clear = run(&base(""), Transport::Memory);
    let secure_text =
        "[secure_aggregation]\nenabled = true\nclip = 0.05\nvalue_bits = 24\nweight_cap = 5000\n";
    let secure = run(&base(secure_text), Transport::Memory);
    assert_eq!(secure.summary.rounds, 1, "{:?}", secure.rounds);
    assert_eq!(secure.rounds[1].participants, 6, "{:?}", secure.rounds);
    let moved = distance(&clear.final_adapter, &clear.initial_adapter);
    let apart = distance(&secure.final_adapter, &clear.final_adapter);
    assert!(
        moved > 0.0 && apart < 1e-3 * moved,
        "secure vs clear: {apart}, the round moved the adapter {moved}"
    );
    // Reproducible, and the QUIC path (real endpoints, mutual TLS) publishes the very same adapters.
    let quic = run(&base(secure_text), Transport::Quic);
    assert_eq!(secure.summary.adapter_digests, quic.summary.adapter_digests);
    assert_eq!(without_wall_time(&secure), without_wall_time(&quic));
    // The rotated encoding (over QUIC: its task crosses the wire): deltas L2-clipped (at a bound above
    // theirs: its resolution is relative to the bound), rotated and summed modulo 2^31 — the same step
    // up to its rounding.
    let rotated = run(
        &base(
            "[secure_aggregation]\nenabled = true\nencoding = \"rotated\"\nclip = 1.0\n\
             modulus_bits = 31\nweight_cap = 5000\n",
        ),
        Transport::Quic,
    );
    assert_eq!(rotated.rounds[1].participants, 6, "{:?}", rotated.rounds);
    let apart = distance(&rotated.final_adapter, &clear.final_adapter);
    assert!(
        apart < 1e-3 * moved,
        "rotated secure vs clear: {apart}, the round moved the adapter {moved}"
    );
    // Equal weights (the default): devices weighed alike, so a different step on these uneven roles,
    // but the same direction broadly.
    let equal = run(
        &base("[secure_aggregation]\nenabled = true\nclip = 0.05\nvalue_bits = 16\n"),
        Transport::Memory,
    );
    let d = |a: &[f32]| -> Vec<f64> {
        a.iter()
            .zip(&clear.initial_adapter)
            .map(|(x, y)| f64::from(x - y))
            .collect()
    };
    let (u, v) = (d(&clear.final_adapter), d(&equal.final_adapter));
    let cos = u.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>()
        / (u.iter().map(|a| a * a).sum::<f64>() * v.iter().map(|b| b * b).sum::<f64>()).sqrt();
    assert!(
        cos > 0.5,
        "cosine between the equal-weight and FedAvg steps: {cos}"
    );
}

#[test]
fn secure_rounds_survive_devices_leaving_at_every_phase() {
    let mut s = small(
        r#"
[devices]
dropout = 0.3
offline_ms = 600000

[secure_aggregation]
enabled = true
phase_timeout_ms = 20000
"#,
    );
    s.simulation.clients_per_round = sim::scenario::PerRound::Count(10);
    s.data.clients = 20;
    s.rounds.min_updates = 2;
    let o = run(&s, Transport::Memory);
    let dropped: usize = o.rounds.iter().map(|r| r.dropouts).sum();
    assert!(dropped > 0, "some selected devices dropped out");
    assert!(o.summary.rounds >= 2, "{:?}", o.rounds);
    for r in &o.rounds[1..] {
        assert!(r.participants >= 3 && r.participants <= 10, "{r:?}");
    }
}

#[test]
fn secure_rounds_with_device_noise_spend_exactly_the_distributed_discrete_gaussians_epsilon() {
    let s = small_with(
        "round_timeout_ms = 60000\nmin_updates = 4",
        r#"
[privacy]
mode = "distributed"
clip = 0.5
noise_multiplier = 1.0
noise_clients = 4
delta = 1e-5
epsilon_budget = 1000.0

[secure_aggregation]
enabled = true
clip = 0.05
value_bits = 10
"#,
    );
    let o = run(&s, Transport::Memory);
    assert_eq!(o.summary.rounds, 3, "{:?}", o.rounds);
    assert!(o.final_adapter.iter().all(|x| x.is_finite()));
    assert_ne!(o.final_adapter, o.initial_adapter);
    // Each device adds 1.0 · 0.5 · 20,480 steps / √4 = 5,120 steps of discrete Gaussian noise; the
    // ledger charges three rounds of the distributed discrete Gaussian at q = 4/16.
    let dir = starling_simulations::sim::scenario::resolve(&s.simulation.base_model, None);
    let model = Llama::load(&dir, None, &starling_model::Backend::default().device()).unwrap();
    let n = sim::adapter_params(&model, &s).unwrap() as u64;
    // (20,480 steps per unit as the encoding computes it from the f32 clip: 2^10 / 0.05f32.)
    let scale = starling_secagg::mask::Encoding::new(0.05, 10, 1)
        .unwrap()
        .scale;
    let event = DdgEvent::new(4, 5120.0, 0.5 * scale, n, 4.0 / 16.0, 1).unwrap();
    let expected = ddg::epsilon(&[event; 3], 1e-5).unwrap().0;
    let got = o.summary.epsilon_user;
    assert!(
        (got - expected).abs() <= 1e-9 * expected,
        "ε {got} vs the accountant's {expected}"
    );
    let eps: Vec<f64> = o.rounds.iter().map(|r| r.epsilon_user).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    // A target ε cannot be calibrated with the Gaussian's accountant here: refused, with the way out.
    let mut target = s.clone();
    target.simulation.target_epsilon = Some(8.0);
    let err = target.validate("test").unwrap_err().to_string();
    assert!(err.contains("ddg-epsilon"), "{err}");
}

/// Chat data in the simulator: a folder data set of JSONL conversations (one file per client) on the
/// shipped model given a ChatML template. Devices train on the assistant turns only and the scores count
/// only those turns' tokens; the federated model fits the held-out answers better than the base.
#[test]
fn chat_conversations_train_and_score_on_assistant_turns_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            root.join("assets/models/starling-tiny").join(f),
            base.join(f),
        )
        .unwrap();
    }
    let template = starling_model::chat::ChatTemplate::new(
        "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}",
        "",
        "",
    )
    .unwrap();
    std::fs::write(base.join("tokenizer_config.json"), template.config_json()).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let names = ["HAMLET", "OPHELIA", "HORATIO", "LAERTES", "GERTRUDE"];
    for c in 0..4 {
        let lines: Vec<String> = (0..40)
            .map(|i| {
                let a = names[(i * 3 + c) % names.len()];
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("Who answers {a}?")},
                    {"role": "assistant", "content": format!("{a}, my lord, is answered by the king.")},
                ]})
                .to_string()
            })
            .collect();
        std::fs::write(data.join(format!("client{c}.jsonl")), lines.join("\n")).unwrap();
    }
    let text = format!(
        r#"
[simulation]
name = "chat"
seed = 3
base_model = "{}"
rounds = 2
clients_per_round = 4

[data]
dataset = "folder"
partition = "folders"
path = "{}"
min_bytes = 100

[evaluation]
clients = 4
windows_per_client = 2
seq_len = 64

[task]
local_steps = 6
batch_size = 4
seq_len = 64
learning_rate = 0.01

[adapter]
rank = 4
targets = ["q", "v"]
"#,
        base.display(),
        data.display()
    );
    let s = Scenario::parse(&text, "chat scenario").unwrap();
    let loaded = sim::load(&s, None).unwrap();
    assert!(loaded.data.chat);
    let o = run(&s, Transport::Memory);
    let (first, last) = (&o.rounds[0], o.rounds.last().unwrap());
    let (before, after) = (first.test_loss.unwrap(), last.test_loss.unwrap());
    eprintln!(
        "chat: assistant-turn loss {before:.4} → {after:.4}, accuracy {:.4} → {:.4}",
        first.accuracy.unwrap(),
        last.accuracy.unwrap()
    );
    assert!(after < before, "{after} is not below {before}");
    // Only assistant tokens are scored: the evaluation counts fewer tokens than the windows hold.
    let windows =
        sim::eval::EvalSet::new(&loaded.data, &loaded.tok, loaded.chat.as_ref(), &[0], 64, 2)
            .unwrap();
    let all: u64 = windows
        .windows
        .iter()
        .map(|(_, w)| w.len() as u64 - 1)
        .sum();
    assert!(
        windows.tokens() > 0 && windows.tokens() < all / 2,
        "{} of {all}",
        windows.tokens()
    );
    // Without a template the chat data set is refused clearly.
    std::fs::remove_file(base.join("tokenizer_config.json")).unwrap();
    let e = sim::load(&s, None).err().unwrap().to_string();
    assert!(e.contains("chat template"), "{e}");
}
