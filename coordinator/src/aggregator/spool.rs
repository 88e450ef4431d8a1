//! The edge aggregator's durable state in sled: the root's task for the open round, the devices it took
//! into that round's cohort, their updates (stored and flushed before a device gets its ack), the last
//! round forwarded, the copy of the root's roster, and a secure cohort's SecAgg+ state. An aggregator
//! killed at any instant restarts with every acknowledged update and forwards them. What must never live
//! here: decisions (when to forward, whom to take) — those are the service's.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use starling_protocol::message::{RosterDevices, Task};
use starling_protocol::{Fingerprint, Message, RoundId, UpdateId};

use super::secure::SecureCohort;

/// Format version of the spool, checked at open.
const FORMAT: u32 = 1;

/// A roster entry's value for a device revoked at the root (an active device's value is empty).
const REVOKED: &[u8] = b"revoked";

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// sled failed.
    #[error("spool: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("spool: a stored {what} is damaged: {detail}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The directory holds a spool of another format.
    #[error("spool: unknown format in {0}")]
    Format(String),
}

impl From<TransactionError<SpoolError>> for SpoolError {
    fn from(e: TransactionError<SpoolError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => SpoolError::Sled(e),
        }
    }
}

/// A device's update as spooled until the cohort is forwarded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpooledUpdate {
    /// The device's idempotency key.
    pub update_id: UpdateId,
    /// The device.
    pub client: Fingerprint,
    /// Its training examples (the FedAvg weight).
    pub num_examples: u64,
    /// Its mean training loss.
    pub train_loss: f32,
    /// The encoded update, as it came (checked before it was stored).
    pub body: Vec<u8>,
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("encoding into a Vec cannot fail")
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, SpoolError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| SpoolError::Corrupt {
            what,
            detail: e.to_string(),
        })
}

/// A stored value of exactly `N` bytes (a round id, a generation, a fingerprint), or what is damaged.
fn fixed<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], SpoolError> {
    <[u8; N]>::try_from(bytes).map_err(|_| SpoolError::Corrupt {
        what,
        detail: format!("{} bytes", bytes.len()),
    })
}

fn key(round: RoundId, rest: &[u8]) -> Vec<u8> {
    [&round.0.to_be_bytes()[..], rest].concat()
}

/// The spool.
pub struct Spool {
    db: sled::Db,
    meta: sled::Tree,
    selected: sled::Tree,
    updates: sled::Tree,
    index: sled::Tree,
    roster: sled::Tree,
}

impl Spool {
    /// Opens (creating if absent) the spool in `dir`.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        let db = crate::store::open_sled(dir)?;
        let s = Self {
            meta: db.open_tree("meta")?,
            selected: db.open_tree("selected")?,
            updates: db.open_tree("updates")?,
            index: db.open_tree("update_index")?,
            roster: db.open_tree("roster")?,
            db,
        };
        match s.meta.get("format")? {
            None => {
                s.meta.insert("format", &FORMAT.to_be_bytes())?;
                s.db.flush()?;
            }
            Some(v) if v.as_ref() == FORMAT.to_be_bytes() => {}
            Some(_) => return Err(SpoolError::Format(dir.display().to_string())),
        }
        Ok(s)
    }

    /// The root's task for the open round, if one was taken.
    pub fn task(&self) -> Result<Option<Task>, SpoolError> {
        let Some(raw) = self.meta.get("task")? else {
            return Ok(None);
        };
        match Message::decode(&raw) {
            Ok(Message::Task(t)) => Ok(Some(*t)),
            Ok(_) => Err(SpoolError::Corrupt {
                what: "task",
                detail: "not a task".into(),
            }),
            Err(e) => Err(SpoolError::Corrupt {
                what: "task",
                detail: e.to_string(),
            }),
        }
    }

    /// Takes a new round's task; the cohort and updates of any earlier round are dropped (flushed).
    pub fn put_task(&self, task: &Task) -> Result<(), SpoolError> {
        self.drop_rounds_before(task.round)?;
        self.meta.remove("secure")?;
        self.meta
            .insert("task", Message::Task(Box::new(task.clone())).encode())?;
        self.db.flush()?;
        Ok(())
    }

    /// The last round forwarded to the root (or given up).
    pub fn forwarded(&self) -> Result<Option<RoundId>, SpoolError> {
        self.meta
            .get("forwarded")?
            .map(|v| fixed(&v, "forwarded round").map(|b| RoundId(u64::from_be_bytes(b))))
            .transpose()
    }

    /// Records `round` as forwarded (or given up) and drops its cohort and updates (flushed).
    pub fn set_forwarded(&self, round: RoundId) -> Result<(), SpoolError> {
        self.meta.insert("forwarded", &round.0.to_be_bytes())?;
        self.meta.remove("secure")?;
        self.db.flush()?;
        self.drop_rounds_before(RoundId(round.0 + 1))?;
        self.db.flush()?;
        Ok(())
    }

    fn drop_rounds_before(&self, round: RoundId) -> Result<(), SpoolError> {
        for tree in [&self.selected, &self.updates] {
            for kv in tree.range(..round.0.to_be_bytes().to_vec()) {
                tree.remove(kv?.0)?;
            }
        }
        Ok(())
    }

    /// Takes `client` into `round`'s cohort (flushed).
    pub fn select(&self, round: RoundId, client: &Fingerprint) -> Result<(), SpoolError> {
        self.selected.insert(key(round, &client.0), &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// Lets `client` out of `round`'s cohort (it declined).
    pub fn unselect(&self, round: RoundId, client: &Fingerprint) -> Result<(), SpoolError> {
        self.selected.remove(key(round, &client.0))?;
        self.db.flush()?;
        Ok(())
    }

    /// The devices taken into `round`'s cohort.
    pub fn selected(&self, round: RoundId) -> Result<HashSet<Fingerprint>, SpoolError> {
        let mut out = HashSet::new();
        for kv in self.selected.scan_prefix(round.0.to_be_bytes()) {
            let k = kv?.0;
            out.insert(Fingerprint(fixed(
                k.get(8..).unwrap_or_default(),
                "cohort entry",
            )?));
        }
        Ok(out)
    }

    /// Stores a device's update for `round` durably (flushed): call before acknowledging it.
    pub fn put_update(&self, round: RoundId, u: &SpooledUpdate) -> Result<(), SpoolError> {
        let k = key(round, &u.update_id.0);
        (&self.updates, &self.index).transaction(|(updates, index)| {
            updates.insert(k.clone(), encode(u))?;
            index.insert(&u.update_id.0, &round.0.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<SpoolError>>(())
        })?;
        self.db.flush()?;
        Ok(())
    }

    /// Drops the updates `client` spooled for `round` (it was revoked before they were forwarded); the
    /// ids stay known, so a resend is not taken again. Returns how many were dropped.
    pub fn drop_updates_of(
        &self,
        round: RoundId,
        client: &Fingerprint,
    ) -> Result<usize, SpoolError> {
        let mut dropped = 0;
        for kv in self.updates.scan_prefix(round.0.to_be_bytes()) {
            let (k, v) = kv?;
            let u: SpooledUpdate = decode(&v, "update")?;
            if u.client == *client {
                self.updates.remove(k)?;
                dropped += 1;
            }
        }
        self.db.flush()?;
        Ok(dropped)
    }

    /// Whether an update id was ever spooled (a retry after a lost ack).
    pub fn has_update(&self, id: &UpdateId) -> Result<bool, SpoolError> {
        Ok(self.index.contains_key(id.0)?)
    }

    /// Every update spooled for `round`, in update-id order.
    pub fn updates(&self, round: RoundId) -> Result<Vec<SpooledUpdate>, SpoolError> {
        self.updates
            .scan_prefix(round.0.to_be_bytes())
            .map(|kv| decode(&kv?.1, "update"))
            .collect()
    }

    /// The secure cohort of `round` (SecAgg+ state: keys, ciphertexts, the masked sum, reveals), if one
    /// was fixed.
    pub fn secure(&self, round: RoundId) -> Result<Option<SecureCohort>, SpoolError> {
        let Some(raw) = self.meta.get("secure")? else {
            return Ok(None);
        };
        let c: SecureCohort = decode(&raw, "secure cohort")?;
        Ok((c.round == round).then_some(c))
    }

    /// Stores (and flushes) the secure cohort after a change, before the device hears of it.
    pub fn put_secure(&self, cohort: &SecureCohort) -> Result<(), SpoolError> {
        self.meta.insert("secure", encode(cohort))?;
        self.db.flush()?;
        Ok(())
    }

    /// The copy of the root's roster: its generation and its devices, active and revoked (one key per
    /// device, its value empty for an active device and [`REVOKED`] for a revoked one, so an enrolment
    /// writes one key, not the whole roster; a spool written before that reads its one blob of active
    /// devices).
    pub fn roster(&self) -> Result<Option<(u64, RosterDevices)>, SpoolError> {
        let Some(g) = self.meta.get("roster_generation")? else {
            return self
                .meta
                .get("roster")?
                .map(|v| {
                    decode::<(u64, Vec<Fingerprint>)>(&v, "roster").map(|(g, active)| {
                        let revoked = Vec::new();
                        (g, RosterDevices { active, revoked })
                    })
                })
                .transpose();
        };
        let generation = u64::from_be_bytes(fixed(&g, "roster generation")?);
        let mut devices = RosterDevices::default();
        for entry in self.roster.iter() {
            let (k, v) = entry?;
            let fp = Fingerprint(fixed(&k, "roster entry")?);
            match v.as_ref() {
                [] => devices.active.push(fp),
                REVOKED => devices.revoked.push(fp),
                _ => {
                    return Err(SpoolError::Corrupt {
                        what: "roster entry",
                        detail: format!("status {:?}", v.as_ref()),
                    })
                }
            }
        }
        Ok(Some((generation, devices)))
    }

    /// Replaces the copy of the root's roster (so a restarted aggregator admits its devices, and refuses
    /// its revoked ones as such, before it reaches the root).
    pub fn put_roster(&self, generation: u64, devices: &RosterDevices) -> Result<(), SpoolError> {
        // Only the difference is written: a refresh after one enrolment or revocation writes one key.
        let status = |revoked: bool| if revoked { REVOKED } else { &[] };
        let want: HashMap<Fingerprint, &[u8]> =
            (devices.active.iter().map(|d| (*d, status(false))))
                .chain(devices.revoked.iter().map(|d| (*d, status(true))))
                .collect();
        let mut held = HashSet::new();
        for entry in self.roster.iter() {
            let (k, v) = entry?;
            match <[u8; 32]>::try_from(k.as_ref()).map(Fingerprint) {
                Ok(fp) if want.get(&fp).is_some_and(|w| *w == v.as_ref()) => {
                    held.insert(fp);
                }
                _ => {
                    self.roster.remove(k)?;
                }
            }
        }
        for (d, v) in want.iter().filter(|(d, _)| !held.contains(*d)) {
            self.roster.insert(d.0, *v)?;
        }
        self.meta
            .insert("roster_generation", &generation.to_be_bytes())?;
        self.meta.remove("roster")?;
        self.db.flush()?;
        Ok(())
    }

    /// Adds one device to the copy of the roster (enrolled through this aggregator).
    pub fn add_to_roster(&self, generation: u64, device: &Fingerprint) -> Result<(), SpoolError> {
        if self.meta.get("roster_generation")?.is_none() {
            // A roster still in its one blob (or none yet): rewritten whole once, then per key.
            let mut devices = self.roster()?.map(|(_, d)| d).unwrap_or_default();
            devices.active.push(*device);
            return self.put_roster(generation, &devices);
        }
        self.roster.insert(device.0, &[])?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_protocol::message::examples;

    fn task(round: u64) -> Task {
        let mut t = examples()
            .into_iter()
            .find_map(|m| match m {
                Message::Task(t) => Some(*t),
                _ => None,
            })
            .unwrap();
        t.round = RoundId(round);
        t
    }

    fn update(i: u8) -> SpooledUpdate {
        SpooledUpdate {
            update_id: UpdateId([i; 16]),
            client: Fingerprint([i; 32]),
            num_examples: u64::from(i),
            train_loss: 1.5,
            body: vec![i; 10],
        }
    }

    #[test]
    fn what_was_spooled_survives_a_reopen_and_forwarding_drops_the_round() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path()).unwrap();
            assert!(s.task().unwrap().is_none());
            s.put_task(&task(3)).unwrap();
            s.select(RoundId(3), &Fingerprint([1; 32])).unwrap();
            s.select(RoundId(3), &Fingerprint([2; 32])).unwrap();
            s.unselect(RoundId(3), &Fingerprint([2; 32])).unwrap();
            s.put_update(RoundId(3), &update(1)).unwrap();
            let devices = RosterDevices {
                active: vec![Fingerprint([1; 32])],
                revoked: Vec::new(),
            };
            s.put_roster(9, &devices).unwrap();
        }
        let s = Spool::open(dir.path()).unwrap();
        assert_eq!(s.task().unwrap().unwrap().round, RoundId(3));
        assert_eq!(
            s.selected(RoundId(3)).unwrap(),
            HashSet::from([Fingerprint([1; 32])])
        );
        assert_eq!(s.updates(RoundId(3)).unwrap(), vec![update(1)]);
        assert!(s.has_update(&UpdateId([1; 16])).unwrap());
        assert_eq!(s.roster().unwrap().unwrap().0, 9);
        s.set_forwarded(RoundId(3)).unwrap();
        assert_eq!(s.forwarded().unwrap(), Some(RoundId(3)));
        assert!(s.updates(RoundId(3)).unwrap().is_empty());
        assert!(s.selected(RoundId(3)).unwrap().is_empty());
        // The id stays known: a device retrying after a lost ack is acknowledged again.
        assert!(s.has_update(&UpdateId([1; 16])).unwrap());
        // A new round's task drops whatever an earlier round left.
        s.put_update(RoundId(4), &update(2)).unwrap();
        s.put_task(&task(5)).unwrap();
        assert!(s.updates(RoundId(4)).unwrap().is_empty());
    }

    #[test]
    fn a_revoked_devices_update_leaves_the_round_and_its_id_stays_known() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        for i in [1, 2] {
            s.put_update(RoundId(3), &update(i)).unwrap();
        }
        s.put_update(RoundId(4), &update(3)).unwrap();
        assert_eq!(
            s.drop_updates_of(RoundId(3), &Fingerprint([1; 32]))
                .unwrap(),
            1
        );
        assert_eq!(
            s.drop_updates_of(RoundId(3), &Fingerprint([3; 32]))
                .unwrap(),
            0
        );
        drop(s);
        let s = Spool::open(dir.path()).unwrap();
        assert_eq!(s.updates(RoundId(3)).unwrap(), vec![update(2)]);
        assert_eq!(s.updates(RoundId(4)).unwrap(), vec![update(3)]);
        assert!(s.has_update(&UpdateId([1; 16])).unwrap());
    }

    #[test]
    fn the_roster_is_kept_per_device_and_a_spool_with_the_old_blob_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let fp = |i: u8| Fingerprint([i; 32]);
        let listed = |active: &[u8], revoked: &[u8]| RosterDevices {
            active: active.iter().map(|i| fp(*i)).collect(),
            revoked: revoked.iter().map(|i| fp(*i)).collect(),
        };
        {
            let s = Spool::open(dir.path()).unwrap();
            // A spool written before per-device keys: the roster as one blob of active devices.
            s.meta
                .insert("roster", encode(&(4u64, vec![fp(1), fp(2)])))
                .unwrap();
            assert_eq!(s.roster().unwrap(), Some((4, listed(&[1, 2], &[]))));
            s.add_to_roster(5, &fp(3)).unwrap();
            assert_eq!(s.roster().unwrap(), Some((5, listed(&[1, 2, 3], &[]))));
            s.add_to_roster(5, &fp(4)).unwrap();
        }
        let s = Spool::open(dir.path()).unwrap();
        assert_eq!(s.roster().unwrap(), Some((5, listed(&[1, 2, 3, 4], &[]))));
        // A refresh from the root replaces it: device 1 left, device 3 was revoked (and is listed so),
        // device 9 is new.
        s.put_roster(7, &listed(&[4, 2, 9], &[3])).unwrap();
        assert_eq!(s.roster().unwrap(), Some((7, listed(&[2, 4, 9], &[3]))));
        drop(s);
        let s = Spool::open(dir.path()).unwrap();
        assert_eq!(s.roster().unwrap(), Some((7, listed(&[2, 4, 9], &[3]))));
        // An entry the spool never wrote is a typed error, not a guess.
        s.roster.insert(fp(5).0, &b"?"[..]).unwrap();
        assert!(matches!(s.roster(), Err(SpoolError::Corrupt { .. })));
    }
}
