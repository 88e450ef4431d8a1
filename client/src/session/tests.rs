//! The session's rules, event by event, with real signed manifests and real accountants.

use super::*;
use starling_protocol::message::{DpSgdTask, DpTask, LoraSpec, TrainParams};
use starling_protocol::{AdapterSchema, DpMode, DpRecord, Encoding, SigningIdentity, TensorSpec};

fn key() -> SigningIdentity {
    SigningIdentity::from_seed([7; 32])
}

fn schema() -> AdapterSchema {
    AdapterSchema::new(vec![TensorSpec {
        name: "a".into(),
        shape: vec![4, 8],
    }])
    .unwrap()
}

fn adapter(version: u64) -> Vec<u8> {
    (0..32)
        .flat_map(|i| (i as f32 * version as f32).to_le_bytes())
        .collect()
}

/// The signed manifest of `version`, chained to `parent`.
fn manifest(
    version: u64,
    parent: Option<&SignedManifest>,
    signer: &SigningIdentity,
) -> SignedManifest {
    Manifest {
        version: ModelVersion(version),
        parent_digest: parent.map(SignedManifest::digest),
        base_digest: Digest::of(b"base"),
        adapter_digest: Digest::of(&adapter(version)),
        adapter_schema: schema(),
        round: RoundId(version),
        strategy: "fedavg".into(),
        dp: DpRecord {
            mode: DpMode::Off,
            noise_multiplier: 0.0,
            clip: 0.0,
            epsilon_spent: 0.0,
            delta: 0.0,
        },
        created_at_unix_ms: 1,
    }
    .sign(signer)
}

fn task(round: u64, m: SignedManifest, dp_sgd: Option<DpSgdTask>) -> Box<Task> {
    Box::new(Task {
        round: RoundId(round),
        manifest: m,
        deadline_unix_ms: u64::MAX,
        params: TrainParams {
            local_steps: 10,
            batch_size: 4,
            seq_len: 16,
            learning_rate: 1e-3,
            fedprox_mu: 0.0,
            optimizer: Default::default(),
        },
        dp: DpTask { user: None, dp_sgd },
        lora: LoraSpec {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q".into()],
        },
        encoding: Encoding::F32,
        max_update_bytes: 1 << 20,
        secagg: None,
    })
}

fn config() -> SessionConfig {
    SessionConfig {
        signing_keys: vec![key().public_key()],
        max_epsilon: None,
        delta: 1e-5,
        accountant: AccountantKind::Rdp,
        window: None,
        backoff_base_ms: 100,
        backoff_max_ms: 1000,
        seed: 1,
        retry_ms: 500,
    }
}

fn pending(round: u64) -> PendingUpdate {
    PendingUpdate {
        round,
        update_id: hex(&[round as u8; 16]),
        model_version: round - 1,
        schema: schema().hash().to_hex(),
        num_examples: 12,
        metrics: UpdateMetrics {
            train_loss: 2.0,
            steps: 10,
            epsilon_spent: 0.0,
        },
        body_size: 10,
        body_digest: Digest::of(b"x").to_hex(),
        stored_as: None,
        terms: String::new(),
    }
}

fn connected(s: &mut Session) -> Vec<Action> {
    assert_eq!(s.handle(0, Event::Start), vec![Action::Connect]);
    s.handle(
        1,
        Event::Connected {
            client_id: key().fingerprint(),
        },
    )
}

/// Drives a session through one whole round on `m` (a new version): returns the actions of each step.
fn full_round(s: &mut Session, round: u64, m: &SignedManifest, version: u64) {
    let a = s.handle(
        2,
        Event::TaskOffered {
            task: task(round, m.clone(), None),
            local_minute: 0,
        },
    );
    assert!(
        matches!(
            &a[..],
            [Action::Prepare {
                fetch_adapter: true,
                ..
            }]
        ),
        "{a:?}"
    );
    let a = s.handle(
        3,
        Event::Prepared {
            adapter: Some(adapter(version)),
            train_tokens: 1000,
        },
    );
    assert_eq!(a, vec![Action::Persist, Action::CheckEligibility]);
    assert_eq!(s.progress().held.as_ref().unwrap().version, version);
    let a = s.handle(
        4,
        Event::Eligibility {
            allowed: true,
            detail: String::new(),
        },
    );
    assert!(matches!(&a[..], [Action::Train { .. }]), "{a:?}");
    let mut p = pending(round);
    p.terms = task_terms(&task(round, m.clone(), None));
    let a = s.handle(5, Event::Trained(Box::new(p.clone())));
    assert_eq!(a, vec![Action::Persist, Action::Upload(p.clone())]);
    assert_eq!(s.progress().pending, Some(p.clone()));
    let a = s.handle(
        6,
        Event::Acked {
            update_id: p.id().unwrap(),
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Persist,
            Action::DiscardPending { round },
            Action::RequestTask {
                held: Some(ModelVersion(version))
            }
        ]
    );
}

#[test]
fn a_round_goes_task_prepare_train_persist_upload_ack() {
    let mut s = Session::new(config(), Progress::default());
    assert_eq!(connected(&mut s), vec![Action::RequestTask { held: None }]);
    let m0 = manifest(0, None, &key());
    full_round(&mut s, 1, &m0, 0);
    assert_eq!(s.progress().rounds_joined, vec![1]);
    assert_eq!(s.progress().pending, None);
    // The next version chains to the held one and is fetched; a task on the held version is not.
    let m1 = manifest(1, Some(&m0), &key());
    full_round(&mut s, 2, &m1, 1);
    let a = s.handle(
        7,
        Event::TaskOffered {
            task: task(3, m1, None),
            local_minute: 0,
        },
    );
    assert!(
        matches!(
            &a[..],
            [Action::Prepare {
                fetch_adapter: false,
                ..
            }]
        ),
        "{a:?}"
    );
    assert_eq!(s.progress().rounds_joined, vec![1, 2]);
}

#[test]
fn a_restarted_device_resends_its_pending_update_and_never_retrains_the_round() {
    let progress = Progress {
        pending: Some(pending(4)),
        trained_rounds: vec![4],
        ..Progress::default()
    };
    let mut s = Session::new(config(), progress);
    assert_eq!(connected(&mut s), vec![Action::Upload(pending(4))]);
    // The connection drops before the ack: reconnect after a backoff, then the same update again.
    let a = s.handle(
        10,
        Event::Disconnected {
            error: "reset".into(),
            refusal: None,
        },
    );
    let [Action::Wait { until }] = a[..] else {
        panic!("{a:?}")
    };
    assert!(until <= 10 + 100);
    assert_eq!(s.handle(until, Event::Timer), vec![Action::Connect]);
    assert_eq!(
        s.handle(
            until,
            Event::Connected {
                client_id: key().fingerprint()
            }
        ),
        vec![Action::Upload(pending(4))]
    );
    s.handle(
        until,
        Event::Acked {
            update_id: pending(4).id().unwrap(),
        },
    );
    // Offered round 4 again (say its ack raced a coordinator restart): it is not trained twice.
    let a = s.handle(
        until + 1,
        Event::TaskOffered {
            task: task(4, manifest(0, None, &key()), None),
            local_minute: 0,
        },
    );
    assert!(matches!(&a[..], [Action::Wait { .. }]), "{a:?}");
}

#[test]
fn tampered_adapters_foreign_signers_and_rollbacks_are_refused_keeping_the_model() {
    let mut s = Session::new(config(), Progress::default());
    connected(&mut s);
    let m0 = manifest(0, None, &key());
    full_round(&mut s, 1, &m0, 0);
    let m1 = manifest(1, Some(&m0), &key());
    // The adapter bytes do not hash to what the manifest signs.
    s.handle(
        2,
        Event::TaskOffered {
            task: task(2, m1.clone(), None),
            local_minute: 0,
        },
    );
    let a = s.handle(
        3,
        Event::Prepared {
            adapter: Some(adapter(7)),
            train_tokens: 1000,
        },
    );
    assert!(
        matches!(&a[..], [Action::Persist, Action::Wait { .. }]),
        "{a:?}"
    );
    assert_eq!(s.progress().held.as_ref().unwrap().version, 0);
    let err = &s.progress().last_error.as_ref().unwrap().message;
    assert!(
        err.contains("refusing model version 1") && err.contains("keeping version 0"),
        "{err}"
    );
    // Signed by a key the device does not trust.
    s.handle(600, Event::Timer);
    let forged = manifest(1, Some(&m0), &SigningIdentity::from_seed([9; 32]));
    let a = s.handle(
        601,
        Event::TaskOffered {
            task: task(2, forged, None),
            local_minute: 0,
        },
    );
    assert!(
        matches!(&a[..], [Action::Persist, Action::Wait { .. }]),
        "{a:?}"
    );
    assert!(s
        .progress()
        .last_error
        .as_ref()
        .unwrap()
        .message
        .contains("unknown key"));
    // After accepting version 1, version 0's manifest is a rollback.
    s.handle(1200, Event::Timer);
    full_round(&mut s, 2, &m1, 1);
    let mut older = task(3, m0, None);
    older.round = RoundId(3);
    let a = s.handle(
        1300,
        Event::TaskOffered {
            task: older,
            local_minute: 0,
        },
    );
    assert!(
        matches!(&a[..], [Action::Persist, Action::Wait { .. }]),
        "{a:?}"
    );
    assert!(s
        .progress()
        .last_error
        .as_ref()
        .unwrap()
        .message
        .contains("not newer"));
    assert_eq!(s.progress().held.as_ref().unwrap().version, 1);
}

#[test]
fn tasks_past_the_device_budget_are_declined_and_charges_accumulate() {
    let dp = DpSgdTask {
        noise_multiplier: 1.0,
        clip: 1.0,
        sampling_rate: 0.1,
        delta: 1e-5,
    };
    // A budget between what two and three rounds (10 steps each at q = 0.1, σ = 1) cost.
    let sigma = GaussianMechanism::with_multiplier(1.0, 1.0, schema().num_params())
        .unwrap()
        .effective_noise_multiplier();
    let round = DpEvent::new(0.1, sigma, 10).unwrap();
    let eps = |n: usize| {
        accountant::epsilon(&vec![round; n], 1e-5, AccountantKind::Rdp)
            .unwrap()
            .epsilon
    };
    let (two, three) = (eps(2), eps(3));
    assert!(two < three);
    let max = (two + three) / 2.0;
    let mut cfg = config();
    cfg.max_epsilon = Some(max);
    let mut s = Session::new(cfg, Progress::default());
    connected(&mut s);
    let m0 = manifest(0, None, &key());
    let mut declined = None;
    for round in 1..=4 {
        let a = s.handle(
            round * 10,
            Event::TaskOffered {
                task: task(round, m0.clone(), Some(dp)),
                local_minute: 0,
            },
        );
        assert!(matches!(&a[..], [Action::Prepare { .. }]), "{a:?}");
        let a = s.handle(
            round * 10 + 1,
            Event::Prepared {
                adapter: (round == 1).then(|| adapter(0)),
                train_tokens: 16 * 100,
            },
        );
        if let Some(Action::Decline { code, reason, .. }) = a.last() {
            assert_eq!(*code, ErrorCode::BudgetExhausted);
            assert!(reason.contains("max_epsilon"), "{reason}");
            declined = Some(round);
            break;
        }
        s.handle(
            round * 10 + 2,
            Event::Eligibility {
                allowed: true,
                detail: String::new(),
            },
        );
        s.handle(round * 10 + 3, Event::Trained(Box::new(pending(round))));
        s.handle(
            round * 10 + 4,
            Event::Acked {
                update_id: pending(round).id().unwrap(),
            },
        );
    }
    let p = s.progress();
    assert_eq!(declined, Some(3), "charges: {:?}", p.charges);
    assert_eq!(p.charges.len(), 2);
    assert!(p.epsilon() <= max && p.epsilon() > p.charges[0].epsilon_after);
    assert!((p.epsilon() - two).abs() < 1e-12);
    // The ledger's ε is the accountant's for the composed events.
    let events: Vec<DpEvent> = p.charges.iter().map(|c| c.event).collect();
    let direct = accountant::epsilon(&events, 1e-5, AccountantKind::Rdp)
        .unwrap()
        .epsilon;
    assert!((p.epsilon() - direct).abs() < 1e-12);
    assert_eq!(p.declined, 1);
    // The coordinator's answer to the decline is a NoTask: the device waits as told.
    assert!(matches!(
        &s.handle(100, Event::NoTask { retry_after_ms: 50 })[..],
        [Action::Wait { until: 150 }]
    ));
    // With a limit set, a task without DP-SGD is declined: its ε is unbounded.
    s.handle(150, Event::Timer);
    s.handle(
        151,
        Event::TaskOffered {
            task: task(9, m0, None),
            local_minute: 0,
        },
    );
    let a = s.handle(
        152,
        Event::Prepared {
            adapter: None,
            train_tokens: 1600,
        },
    );
    assert!(
        matches!(
            a.last(),
            Some(Action::Decline {
                code: ErrorCode::BudgetExhausted,
                ..
            })
        ),
        "{a:?}"
    );
}

#[test]
fn revocation_and_untrusted_coordinators_stop_the_device() {
    for refusal in [
        Refusal::Revoked,
        Refusal::NotEnrolled,
        Refusal::UntrustedCoordinator,
    ] {
        let mut s = Session::new(config(), Progress::default());
        s.handle(0, Event::Start);
        let a = s.handle(
            1,
            Event::Disconnected {
                error: "closed".into(),
                refusal: Some(refusal),
            },
        );
        assert!(
            matches!(&a[..], [Action::Persist, Action::Stop { error: true, .. }]),
            "{a:?}"
        );
        assert!(s.stopped());
        assert!(s.handle(2, Event::Start).is_empty());
    }
    let mut s = Session::new(config(), Progress::default());
    connected(&mut s);
    let a = s.handle(
        3,
        Event::Refused {
            code: ErrorCode::Revoked,
            message: "key revoked".into(),
        },
    );
    assert!(matches!(
        &a[..],
        [Action::Persist, Action::Stop { error: true, .. }]
    ));
}

#[test]
fn the_training_window_and_eligibility_defer_training() {
    let mut cfg = config();
    cfg.window = TimeWindow::parse("01:00-06:00");
    let mut s = Session::new(cfg, Progress::default());
    connected(&mut s);
    let m0 = manifest(0, None, &key());
    // 23:00 local: wait two hours, then ask again.
    let a = s.handle(
        0,
        Event::TaskOffered {
            task: task(1, m0.clone(), None),
            local_minute: 23 * 60,
        },
    );
    assert_eq!(
        a,
        vec![Action::Wait {
            until: 2 * 60 * 60_000
        }]
    );
    assert!(s.handle(1, Event::Timer).is_empty(), "not yet");
    assert_eq!(
        s.handle(2 * 60 * 60_000, Event::Timer),
        vec![Action::RequestTask { held: None }]
    );
    s.handle(
        10,
        Event::TaskOffered {
            task: task(1, m0, None),
            local_minute: 90,
        },
    );
    s.handle(
        11,
        Event::Prepared {
            adapter: Some(adapter(0)),
            train_tokens: 100,
        },
    );
    let a = s.handle(
        12,
        Event::Eligibility {
            allowed: false,
            detail: "on battery".into(),
        },
    );
    assert_eq!(a, vec![Action::Wait { until: 512 }]);
    assert!(s.progress().trained_rounds.is_empty());
}

#[test]
fn a_refused_upload_is_dropped_but_busy_coordinators_are_retried() {
    let mut s = Session::new(
        config(),
        Progress {
            pending: Some(pending(2)),
            trained_rounds: vec![2],
            ..Progress::default()
        },
    );
    connected(&mut s);
    let a = s.handle(
        5,
        Event::Refused {
            code: ErrorCode::Unavailable,
            message: "retry".into(),
        },
    );
    let [Action::Wait { until }] = a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        s.handle(until, Event::Timer),
        vec![Action::Upload(pending(2))]
    );
    let a = s.handle(
        until,
        Event::Refused {
            code: ErrorCode::LateUpdate,
            message: "closed".into(),
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Persist,
            Action::DiscardPending { round: 2 },
            Action::RequestTask { held: None }
        ]
    );
    assert_eq!(s.progress().pending, None);
    assert!(s.progress().rounds_joined.is_empty());
}

#[test]
fn an_update_whose_round_closed_answers_the_next_round_without_training_again() {
    let mut s = Session::new(config(), Progress::default());
    connected(&mut s);
    let m0 = manifest(0, None, &key());
    // Round 1 is trained and uploaded; the coordinator restarted and closed the round without it.
    let a = s.handle(
        2,
        Event::TaskOffered {
            task: task(1, m0.clone(), None),
            local_minute: 0,
        },
    );
    assert!(matches!(&a[..], [Action::Prepare { .. }]), "{a:?}");
    s.handle(
        3,
        Event::Prepared {
            adapter: Some(adapter(0)),
            train_tokens: 1000,
        },
    );
    s.handle(
        4,
        Event::Eligibility {
            allowed: true,
            detail: String::new(),
        },
    );
    s.handle(5, Event::Trained(Box::new(pending(1))));
    let a = s.handle(
        6,
        Event::Refused {
            code: ErrorCode::LateUpdate,
            message: "round 1 closed".into(),
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Persist,
            Action::RequestTask {
                held: Some(ModelVersion(0))
            }
        ],
        "kept, not discarded"
    );
    let kept = s
        .progress()
        .carried
        .clone()
        .expect("kept for the next round");
    assert_eq!(s.progress().pending, None);

    // Round 2 on the same version and terms: the kept update answers it, relabelled, untrained.
    let a = s.handle(
        7,
        Event::TaskOffered {
            task: task(2, m0.clone(), None),
            local_minute: 0,
        },
    );
    let [Action::Persist, Action::Upload(p)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!((p.round, p.stored_as, p.body_round()), (2, Some(1), 1));
    assert_ne!(p.update_id, kept.update_id, "a fresh id for the new round");
    assert_eq!(p.body_digest, kept.body_digest);
    assert_eq!(s.progress().trained_rounds, vec![1, 2]);
    assert!(s.progress().carried.is_none());
    let a = s.handle(
        8,
        Event::Acked {
            update_id: p.id().unwrap(),
        },
    );
    assert_eq!(a[1], Action::DiscardPending { round: 1 }, "{a:?}");
    assert_eq!(s.progress().rounds_joined, vec![2]);

    // A kept update does not answer a task from a newer model: discarded, and the round is trained.
    let mut s = Session::new(
        config(),
        Progress {
            carried: Some(kept),
            trained_rounds: vec![1],
            ..Progress::default()
        },
    );
    connected(&mut s);
    let m1 = manifest(1, Some(&m0), &key());
    let a = s.handle(
        9,
        Event::TaskOffered {
            task: task(3, m1, None),
            local_minute: 0,
        },
    );
    assert_eq!(
        &a[..2],
        &[Action::Persist, Action::DiscardPending { round: 1 }]
    );
    assert!(s.progress().carried.is_none());
}

/// A task of `round` on `m` with secure aggregation: device `id` of `params`' roster.
fn secure_task(
    round: u64,
    m: SignedManifest,
    params: &starling_secagg::RoundParams,
    id: u32,
) -> Box<Task> {
    let mut t = task(round, m, None);
    t.secagg = Some(SecAggTask {
        params: params.clone(),
        id,
        clip_bits: 1.0f32.to_bits(),
        value_bits: 7,
        weight_cap: 0,
        rotated: None,
    });
    t
}

/// Takes a session from its task to the first secure-aggregation step; returns the step and the
/// pending update (its body is `body`).
fn to_secure_step(s: &mut Session, t: Box<Task>, body: &[u8]) -> (Vec<Action>, PendingUpdate) {
    let round = t.round.0;
    let terms = task_terms(&t);
    assert!(matches!(
        &s.handle(
            2,
            Event::TaskOffered {
                task: t,
                local_minute: 0
            }
        )[..],
        [Action::Prepare { .. }]
    ));
    s.handle(
        3,
        Event::Prepared {
            adapter: Some(adapter(0)),
            train_tokens: 1000,
        },
    );
    let a = s.handle(
        4,
        Event::Eligibility {
            allowed: true,
            detail: String::new(),
        },
    );
    assert!(matches!(&a[..], [Action::Train { .. }]), "{a:?}");
    let mut p = pending(round);
    p.model_version = 0;
    p.body_size = body.len() as u64;
    p.body_digest = Digest::of(body).to_hex();
    let sent = s.handle(5, Event::Trained(Box::new(p.clone())));
    p.terms = terms;
    (sent, p)
}

/// Round 1's parameters for `clients` devices, each the neighbour of all others (threshold 2), with
/// `len` words of `bits` bits.
fn round_params(clients: usize, len: usize, bits: u32) -> starling_secagg::RoundParams {
    starling_secagg::RoundParams {
        round: 1,
        clients,
        neighbours: clients - 1,
        threshold: 2,
        graph_seed: [3; 32],
        len,
        bits,
    }
}

/// The device is out of its secure round (its state dropped) and asks for work again.
fn assert_round_over(s: &Session, a: &[Action]) {
    assert_eq!(
        a,
        [
            Action::Persist,
            Action::RequestTask {
                held: Some(ModelVersion(0))
            }
        ]
    );
    assert_eq!(s.progress().secagg, None);
}

#[test]
fn a_secure_round_goes_keys_shares_masked_upload_reveals_and_the_sum_unmasks() {
    use starling_secagg::mask::{pack, unpack};
    let n = 4u32;
    let params = round_params(n as usize, 16, 12);
    let mut server = starling_secagg::Server::new(params.clone()).unwrap();
    let m0 = manifest(0, None, &key());
    let inputs: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..16).map(|j| (i * 100 + j) & 0xfff).collect())
        .collect();
    let mut bodies: Vec<Vec<u8>> = inputs.iter().map(|x| pack(x, 32)).collect();
    let mut sessions = Vec::new();
    for i in 0..n {
        let mut s = Session::new(config(), Progress::default()).with_entropy([i as u8 + 1; 32]);
        connected(&mut s);
        let (a, p) = to_secure_step(
            &mut s,
            secure_task(1, m0.clone(), &params, i),
            &bodies[i as usize],
        );
        // Keys are persisted before they leave; the update does not leave in the clear.
        let [Action::Persist, Action::SecAgg {
            step: SecAggStep::Keys(keys),
            ..
        }] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert!(s.progress().secagg.is_some() && s.progress().pending == Some(p.clone()));
        server.advertise(i, *keys).unwrap();
        let a = s.handle(6, Event::SecAgg(SecAggReply::Wait { retry_after_ms: 50 }));
        assert!(
            matches!(&a[..], [Action::Persist, Action::Wait { .. }]),
            "{a:?}"
        );
        assert_eq!(
            s.handle(60, Event::Timer),
            vec![Action::SecAgg {
                round: RoundId(1),
                step: SecAggStep::Next
            }]
        );
        sessions.push((s, p));
    }
    // Phase 2: each device gets its neighbours' keys and sends encrypted shares.
    for (i, (s, _)) in sessions.iter_mut().enumerate() {
        let roster = server
            .advertised()
            .iter()
            .filter(|(j, _)| **j != i as u32)
            .map(|(j, k)| (*j, *k))
            .collect();
        let a = s.handle(61, Event::SecAgg(SecAggReply::Roster(roster)));
        let [Action::Persist, Action::SecAgg {
            step: SecAggStep::Shares(msgs),
            ..
        }] = &a[..]
        else {
            panic!("{a:?}")
        };
        // A device restarted now re-sends the very same shares (persisted before they left).
        let mut again = Session::new(config(), s.progress().clone()).with_entropy([99; 32]);
        let resent = connected(&mut again);
        assert_eq!(
            resent,
            vec![Action::SecAgg {
                round: RoundId(1),
                step: SecAggStep::Shares(msgs.clone())
            }]
        );
        server.shares(i as u32, msgs.clone()).unwrap();
        s.handle(62, Event::SecAgg(SecAggReply::Wait { retry_after_ms: 10 }));
        s.handle(80, Event::Timer);
    }
    // Phase 3: mailbox → the driver masks the stored body → the masked update is uploaded.
    for (i, (s, p)) in sessions.iter_mut().enumerate() {
        let a = s.handle(
            81,
            Event::SecAgg(SecAggReply::Mailbox(server.mailbox(i as u32).to_vec())),
        );
        let [Action::Persist, Action::Mask { round: 1, state }] = &a[..] else {
            panic!("{a:?}")
        };
        let masked = crate::secure::mask_body(state, &bodies[i]).unwrap();
        assert_ne!(masked, bodies[i]);
        bodies[i] = masked.clone();
        let a = s.handle(
            82,
            Event::Masked {
                body_size: masked.len() as u64,
                body_digest: Digest::of(&masked).to_hex(),
            },
        );
        let [Action::Persist, Action::Upload(up)] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(
            (up.update_id.clone(), up.body_digest.clone()),
            (p.update_id.clone(), Digest::of(&masked).to_hex())
        );
        server
            .masked_input(i as u32, &unpack(&masked, 12, 16).unwrap())
            .unwrap();
        let a = s.handle(
            83,
            Event::Acked {
                update_id: p.id().unwrap(),
            },
        );
        assert_eq!(
            a[..2],
            [Action::Persist, Action::DiscardPending { round: 1 }]
        );
        assert_eq!(
            a[2],
            Action::SecAgg {
                round: RoundId(1),
                step: SecAggStep::Next
            }
        );
    }
    // Phase 4: a consistent request is answered; the round is over for the device after `Done`.
    let (dropped, reported) = server.unmask_request();
    let mut reveals = Vec::new();
    for (s, _) in sessions.iter_mut() {
        let a = s.handle(
            90,
            Event::SecAgg(SecAggReply::Unmask {
                dropped: dropped.clone(),
                reported: reported.clone(),
            }),
        );
        let [Action::Persist, Action::SecAgg {
            step: SecAggStep::Reveals(r),
            ..
        }] = &a[..]
        else {
            panic!("{a:?}")
        };
        reveals.extend(r.clone());
        let a = s.handle(91, Event::SecAgg(SecAggReply::Done));
        assert_round_over(s, &a);
    }
    let mut want = vec![0u32; 16];
    for x in &inputs {
        for (w, v) in want.iter_mut().zip(x) {
            *w = (*w + v) & 0xfff;
        }
    }
    assert_eq!(server.unmask(&reveals).unwrap(), want);
}

#[test]
fn a_request_for_both_shares_of_a_peer_is_refused_and_the_device_leaves_the_round() {
    let params = round_params(3, 4, 10);
    let mut server = starling_secagg::Server::new(params.clone()).unwrap();
    let m0 = manifest(0, None, &key());
    let mut sessions: Vec<Session> = (0..3u32)
        .map(|i| {
            let mut s = Session::new(config(), Progress::default()).with_entropy([i as u8 + 7; 32]);
            connected(&mut s);
            let (a, _) = to_secure_step(&mut s, secure_task(1, m0.clone(), &params, i), &[0; 16]);
            let Action::SecAgg {
                step: SecAggStep::Keys(k),
                ..
            } = &a[1]
            else {
                panic!("{a:?}")
            };
            server.advertise(i, *k).unwrap();
            s.handle(6, Event::SecAgg(SecAggReply::Wait { retry_after_ms: 1 }));
            s.handle(7, Event::Timer);
            s
        })
        .collect();
    let roster: Vec<(u32, PublicKeys)> =
        server.advertised().iter().map(|(j, k)| (*j, *k)).collect();
    for (i, s) in sessions.iter_mut().enumerate() {
        let mine = roster
            .iter()
            .filter(|(j, _)| *j != i as u32)
            .copied()
            .collect();
        let a = s.handle(8, Event::SecAgg(SecAggReply::Roster(mine)));
        let Action::SecAgg {
            step: SecAggStep::Shares(m),
            ..
        } = &a[1]
        else {
            panic!("{a:?}")
        };
        server.shares(i as u32, m.clone()).unwrap();
        s.handle(9, Event::SecAgg(SecAggReply::Wait { retry_after_ms: 1 }));
        s.handle(10, Event::Timer);
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        let a = s.handle(
            11,
            Event::SecAgg(SecAggReply::Mailbox(server.mailbox(i as u32).to_vec())),
        );
        let Action::Mask { state, .. } = &a[1] else {
            panic!("{a:?}")
        };
        let masked = crate::secure::mask_body(state, &[0; 16]).unwrap();
        s.handle(
            12,
            Event::Masked {
                body_size: masked.len() as u64,
                body_digest: Digest::of(&masked).to_hex(),
            },
        );
        s.handle(
            13,
            Event::Acked {
                update_id: pending(1).id().unwrap(),
            },
        );
    }
    // A coordinator names device 0 as dropped and as reported: revealing both of its shares would
    // unmask its input. The device refuses, reveals nothing and leaves the round.
    let s = &mut sessions[1];
    let a = s.handle(
        14,
        Event::SecAgg(SecAggReply::Unmask {
            dropped: vec![0],
            reported: vec![0, 1, 2],
        }),
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::SecAgg { .. })),
        "{a:?}"
    );
    assert_round_over(s, &a);
    assert!(s
        .progress()
        .last_error
        .as_ref()
        .unwrap()
        .message
        .contains("dropped and as reported"));
    // A device without a source of randomness declines secure tasks instead of drawing weak keys.
    let mut plain = Session::new(config(), Progress::default());
    connected(&mut plain);
    let a = plain.handle(
        2,
        Event::TaskOffered {
            task: secure_task(2, m0, &params, 0),
            local_minute: 0,
        },
    );
    assert!(
        matches!(
            &a[..],
            [
                Action::Persist,
                Action::Decline {
                    code: ErrorCode::Unavailable,
                    ..
                }
            ]
        ),
        "{a:?}"
    );
}
