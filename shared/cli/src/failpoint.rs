//! Crash points for the recovery tests of both binaries. When the environment variable `STARLING_FAILPOINT`
//! names a point, the process announces `failpoint <name>` on stderr when it reaches that point and stops
//! there until it is killed, so a test can SIGKILL a real `serve` or `starling-client run` at an exact step.
//! Unset (always, in production), a point costs one cached comparison.
//! What must never live here: anything that changes state or behaviour other than stopping.

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable naming the point to stop at.
pub const VAR: &str = "STARLING_FAILPOINT";

/// The points. Coordinator: the body of an upload received but not yet stored; an update stored (flushed)
/// but not yet acknowledged; a round aggregated but nothing published; a version published (one flushed
/// transaction) but the engine and the update tree not yet told; a secure round's masked input added to
/// the stored masked sum but not yet acknowledged. Device: an update computed and persisted but not yet
/// uploaded. Edge aggregator: a device's update spooled (flushed) but not yet acknowledged; a cohort
/// complete (every update acknowledged) but its partial sum not yet forwarded.
pub const POINTS: [&str; 8] = [
    "upload-received",
    "upload-stored",
    "aggregated",
    "published",
    "masked-input-stored",
    "update-persisted",
    "aggregator-update-spooled",
    "aggregator-forwarding",
];

/// Stops here, forever, when `STARLING_FAILPOINT` names `point`.
pub fn hit(point: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(VAR).ok().filter(|p| !p.is_empty()));
    if armed.as_deref() == Some(point) {
        eprintln!("failpoint {point}: stopped here until killed");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
