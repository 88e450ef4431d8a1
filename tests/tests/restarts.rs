//! The restart probe: five real devices train eight rounds while the coordinator is SIGKILLed at twenty
//! random instants (1–5 s apart, seeded) and restarted on the same directory at once. Because the
//! restarted coordinator resets the connections its previous run left (its stateless-reset key is derived
//! from its persistent TLS key), devices notice within a keep-alive and reconnect; the open round's
//! deadline moves by the downtime; acknowledged updates are in the store. Goal: no round abandoned, no
//! acknowledged update lost. The run beside an uninterrupted one prints both times.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use starling_tests::{split_play, Coord, Device, Serving};

const DEVICES: usize = 5;
const ROUNDS: u64 = 8;
const KILLS: usize = 20;

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http = false
[rounds]
min_clients = 5
selection = { count = 5 }
min_updates = 3
# Rounds close when all five report; the deadline only bounds a round some device never finishes. Three minutes
# keeps a round whose five debug-built trainings run on two loaded cores (≈ 60 s seen) from being
# abandoned, which the probe would read as a round lost to a kill.
round_timeout_ms = 180000
rounds = 8
retry_after_ms = 200
[task]
local_steps = 40
batch_size = 8
seq_len = 64
learning_rate = 0.004
[adapter]
rank = 2
alpha = 4.0
targets = ["q", "v"]
"#;

/// What one federation run left: published round ids with their update counts, and each device's
/// acknowledged rounds.
struct Outcome {
    rounds: Vec<(u64, u64)>,
    acked: Vec<BTreeSet<u64>>,
    seconds: f64,
    kills: usize,
    /// Devices that waited out an idle timeout on a dead connection.
    idle_timeouts: usize,
    /// Devices that learnt of a restart from the new coordinator's stateless reset.
    resets: usize,
}

fn federation(dir: &Path, kills: usize, seed: u64) -> Outcome {
    let data = split_play(dir, DEVICES);
    let coord = Coord::init(&dir.join("coord"), CONFIG);
    let enrolments: Vec<_> = (0..DEVICES)
        .map(|i| coord.enrol(&format!("device-{i}")))
        .collect();
    let mut serving = Serving::start(&coord);
    let devices: Vec<Device> = enrolments
        .iter()
        .enumerate()
        .map(|(i, e)| Device::enrol(&dir.join(format!("dev{i}")), &serving, e))
        .collect();
    // Restarts keep the address the devices enrolled with.
    coord.keep_address(&serving);
    let started = Instant::now();
    let procs: Vec<_> = devices
        .iter()
        .zip(&data)
        .map(|(d, data)| d.run(data, None))
        .collect();
    let mut state = seed;
    let mut done = 0;
    while done < kills {
        // xorshift: a seeded instant in 1–5 s.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let wait = Duration::from_millis(1000 + state % 4001);
        std::thread::sleep(wait);
        if serving.proc.has_exited() {
            break;
        }
        serving.proc.kill_now();
        done += 1;
        serving = Serving::start(&coord);
    }
    assert!(
        serving.proc.wait_exit(600).success(),
        "serve finishes the rounds"
    );
    let seconds = started.elapsed().as_secs_f64();
    let idle_timeouts = procs
        .iter()
        .filter(|p| p.printed("(connection: timed out)"))
        .count();
    let resets = procs.iter().filter(|p| p.printed("reset by peer")).count();
    for p in procs {
        p.terminate();
        let _ = p.wait_exit(30);
    }
    let status = coord.status();
    let rounds = status["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["round"].as_u64().unwrap(), r["updates"].as_u64().unwrap()))
        .collect();
    // Each device's acknowledged rounds, from its own persisted progress.
    let acked = devices
        .iter()
        .map(|d| {
            let text = std::fs::read_to_string(d.dir.join("progress.json")).unwrap();
            let progress: serde_json::Value = serde_json::from_str(&text).unwrap();
            progress["rounds_joined"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_u64())
                .collect()
        })
        .collect();
    Outcome {
        rounds,
        acked,
        seconds,
        kills: done,
        idle_timeouts,
        resets,
    }
}

fn check(o: &Outcome, what: &str) {
    let ids: Vec<u64> = o.rounds.iter().map(|r| r.0).collect();
    assert_eq!(
        ids,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "{what}: a round id missing is a round abandoned"
    );
    for &(round, updates) in &o.rounds {
        let acked = o.acked.iter().filter(|a| a.contains(&round)).count() as u64;
        assert!(
            acked <= updates,
            "{what}: round {round} counts {updates} updates but {acked} devices hold an ack for it"
        );
    }
}

#[test]
fn sigkilling_the_coordinator_twenty_times_loses_no_round_and_no_acknowledged_update() {
    let tmp = tempfile::tempdir().unwrap();
    let calm = federation(&tmp.path().join("calm"), 0, 1);
    check(&calm, "uninterrupted");
    let probe = federation(&tmp.path().join("killed"), KILLS, 0x5eed_cafe);
    check(&probe, "killed");
    let updates = |o: &Outcome| o.rounds.iter().map(|r| r.1).sum::<u64>();
    eprintln!(
        "{{\"probe\":\"restarts\",\"kills\":{},\"rounds\":{},\"abandoned\":0,\"updates\":{},\
         \"updates_uninterrupted\":{},\"devices_reset\":{},\"idle_timeouts\":{},\"seconds\":{:.1},\
         \"seconds_uninterrupted\":{:.1},\"ratio\":{:.2}}}",
        probe.kills,
        probe.rounds.len(),
        updates(&probe),
        updates(&calm),
        probe.resets,
        probe.idle_timeouts,
        probe.seconds,
        calm.seconds,
        probe.seconds / calm.seconds
    );
    assert_eq!(
        probe.idle_timeouts, 0,
        "a device waited out its idle timeout: the restarted coordinator did not reset its connection"
    );
    assert!(
        probe.resets > 0,
        "no device saw a stateless reset from a restarted coordinator"
    );
    assert!(
        probe.kills >= KILLS / 2,
        "the coordinator was killed only {} times before finishing",
        probe.kills
    );
}
