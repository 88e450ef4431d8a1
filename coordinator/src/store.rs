//! Durable coordinator state in sled 0.34: every change an acknowledgement or a publication depends on is
//! flushed to disk before the caller proceeds, and multi-tree changes (publishing a version) are one sled
//! transaction, so a coordinator killed at any instant restarts into a consistent state.
//!
//! Trees (DESIGN.md §6): `clients` (fingerprint → [`ClientRecord`]), `tokens` (token hash → pending
//! enrolment), `rounds` (round id → [`RoundRecord`]), `updates` (round ‖ update id → [`StoredUpdate`]),
//! `update_index` (update id → round), `models` (version → [`PublishedModel`]), `ledger` (round →
//! privacy charge), `meta` (strategy state, next round id, completed rounds, global ledger); for a tier of
//! edge aggregators: `roles` and `token_roles` (fingerprint or token hash → [`ClientRole`], absent: a
//! device), `enrolled_via` (device fingerprint → the aggregator it enrolled through) and `partials`
//! (round ‖ update id → [`StoredPartial`], the partial sums aggregators forwarded).
//! Keys are big-endian so sled's order is numeric order. Values are bincode 2 (the protocol's config is not
//! reused: this is storage, versioned by `meta/format`).
//! What must never live here: decisions. The store records what the engine and strategy decided.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use starling_protocol::{
    Digest, Fingerprint, ModelVersion, RoundId, SignedManifest, TokenHash, UpdateId,
};

use crate::engine::{RoundRecord, UpdateMeta};
pub use crate::round_core::{PublishedModel, RoundCharge};
use crate::secagg::SecAggRound;
use crate::strategy::StrategyState;
use starling_privacy::ddg::DdgEvent;

/// Storage format version written at creation and checked at open.
const FORMAT: u32 = 1;

/// One tree of the store, read whole: its name and key/value pairs in key order.
pub type TreeDump = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// Every tree of the store (what a backup holds).
const TREES: [&str; 13] = [
    "clients",
    "tokens",
    "roles",
    "token_roles",
    "enrolled_via",
    "partials",
    "rounds",
    "updates",
    "update_index",
    "models",
    "ledger",
    "ledger_ddg",
    "meta",
];

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value did not decode.
    #[error("store holds a malformed {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// The directory holds another format or no store at all.
    #[error("not a Starling store of format {FORMAT}: {0}")]
    Format(String),
    /// A write would break an invariant (e.g. publishing a version twice).
    #[error("store conflict: {0}")]
    Conflict(String),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// Whether a client may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ClientStatus {
    /// Enrolled and allowed.
    Active,
    /// Revoked by the operator.
    Revoked,
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientRecord {
    /// Its key fingerprint (the client id).
    pub fingerprint: Fingerprint,
    /// The name given at enrolment.
    pub name: String,
    /// Active or revoked.
    pub status: ClientStatus,
    /// Enrolment time (Unix ms).
    pub enrolled_at: u64,
    /// Last request (Unix ms).
    pub last_seen: u64,
    /// Tasks this device declined (its own policy: privacy budget, memory, ...).
    pub declines: u64,
    /// The most recent decline, as the device stated it.
    pub last_decline: Option<DeclineRecord>,
}

/// A task a device declined, as recorded for the operator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeclineRecord {
    /// The round declined.
    pub round: RoundId,
    /// The device's typed reason (an error code name, e.g. `BudgetExhausted`).
    pub code: String,
    /// The device's explanation.
    pub reason: String,
    /// When (Unix ms).
    pub at: u64,
}

/// A token issued by `enrol`, waiting for its device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingToken {
    /// The device name the operator chose.
    pub name: String,
    /// Issue time (Unix ms).
    pub created_at: u64,
}

/// What an enrolled key is: a device, or an edge aggregator that forwards its cohort's partial sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRole {
    /// A device: trains and uploads updates.
    #[default]
    Device,
    /// An edge aggregator: serves devices and forwards partial sums.
    Aggregator,
}

impl ClientRole {
    fn byte(self) -> u8 {
        match self {
            ClientRole::Device => 0,
            ClientRole::Aggregator => 1,
        }
    }

    fn from_stored(v: Option<sled::IVec>) -> Self {
        match v.as_deref() {
            Some([1]) => ClientRole::Aggregator,
            _ => ClientRole::Device,
        }
    }
}

/// A partial sum an edge aggregator forwarded, as stored until its round is aggregated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredPartial {
    /// Engine metadata (the aggregator is the engine's participant).
    pub meta: UpdateMeta,
    /// The sum, its device count, weight and summed losses.
    pub partial: crate::round_core::PartialSum,
    /// The clip bound its deltas were clipped to (`None`: DP off).
    pub clip: Option<f64>,
}

/// An update as stored: what the engine needs plus the encoded delta and its report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredUpdate {
    /// Engine metadata.
    pub meta: UpdateMeta,
    /// Mean local training loss reported.
    pub train_loss: f32,
    /// The encoded update (protocol update format).
    pub body: Vec<u8>,
}

/// The resolution of a client record's `last_seen` (one minute: what an operator's "last seen" needs,
/// and a population polling every few seconds writes its records a twelfth as often).
pub const SEEN_RESOLUTION_MS: u64 = 60_000;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("encoding into a Vec cannot fail")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt {
            what,
            detail: e.to_string(),
        })
}

fn update_key(round: RoundId, id: &UpdateId) -> Vec<u8> {
    [&round.0.to_be_bytes()[..], &id.0[..]].concat()
}

/// The coordinator's durable state.
pub struct Store {
    db: sled::Db,
    clients: sled::Tree,
    tokens: sled::Tree,
    rounds: sled::Tree,
    updates: sled::Tree,
    update_index: sled::Tree,
    models: sled::Tree,
    ledger: sled::Tree,
    /// Rounds charged as the distributed discrete Gaussian: their events (the ledger tree keeps their
    /// charge record too).
    ledger_ddg: sled::Tree,
    meta: sled::Tree,
    roles: sled::Tree,
    token_roles: sled::Tree,
    via: sled::Tree,
    partials: sled::Tree,
    /// When `touch` last wrote each client's `last_seen` (this process only).
    seen: std::sync::Mutex<std::collections::HashMap<Fingerprint, u64>>,
}

impl Store {
    /// Creates a new store in `dir` (which must not hold one).
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        let s = Self::open_db(dir)?;
        if s.meta.get("format")?.is_some() {
            return Err(StoreError::Format(format!(
                "{} already holds a store",
                dir.display()
            )));
        }
        s.meta.insert("format", &FORMAT.to_be_bytes())?;
        s.db.flush()?;
        Ok(s)
    }

    /// Opens an existing store.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        if !dir.join("db").exists() && !dir.join("conf").exists() {
            return Err(StoreError::Format(format!("no store in {}", dir.display())));
        }
        let s = Self::open_db(dir)?;
        match s.meta.get("format")? {
            Some(v) if v.as_ref() == FORMAT.to_be_bytes() => Ok(s),
            Some(_) => Err(StoreError::Format("unknown format version".into())),
            None => Err(StoreError::Format(format!("no store in {}", dir.display()))),
        }
    }

    fn open_db(dir: &Path) -> Result<Self, StoreError> {
        let db = open_sled(dir)?;
        Ok(Self {
            clients: db.open_tree("clients")?,
            tokens: db.open_tree("tokens")?,
            rounds: db.open_tree("rounds")?,
            updates: db.open_tree("updates")?,
            update_index: db.open_tree("update_index")?,
            models: db.open_tree("models")?,
            ledger: db.open_tree("ledger")?,
            ledger_ddg: db.open_tree("ledger_ddg")?,
            meta: db.open_tree("meta")?,
            roles: db.open_tree("roles")?,
            token_roles: db.open_tree("token_roles")?,
            via: db.open_tree("enrolled_via")?,
            partials: db.open_tree("partials")?,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
            db,
        })
    }

    /// Flushes everything written so far to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    // ---- clients and tokens ----

    /// Records a pending enrolment token (only its hash).
    pub fn add_token(&self, hash: TokenHash, token: &PendingToken) -> Result<(), StoreError> {
        self.add_token_for(hash, token, ClientRole::Device)
    }

    /// Records a pending enrolment token for a key of `role`.
    pub fn add_token_for(
        &self,
        hash: TokenHash,
        token: &PendingToken,
        role: ClientRole,
    ) -> Result<(), StoreError> {
        (&self.tokens, &self.token_roles).transaction(|(tokens, roles)| {
            tokens.insert(&hash.0 .0, encode(token))?;
            if role != ClientRole::Device {
                roles.insert(&hash.0 .0, &[role.byte()])?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// The role of an enrolled key (a device unless enrolled as something else).
    pub fn role(&self, fp: &Fingerprint) -> Result<ClientRole, StoreError> {
        Ok(ClientRole::from_stored(self.roles.get(fp.0)?))
    }

    /// Enrols `client` with a token: consumes the token and registers the key atomically. `None` if the
    /// token is unknown or used.
    pub fn enrol(
        &self,
        hash: TokenHash,
        client: Fingerprint,
        now: u64,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.enrol_as(hash, client, now, None, None)
    }

    /// [`Store::enrol`] that, with `only`, accepts only a token issued for that role (an aggregator enrolling
    /// a device cannot spend an aggregator's token); a token of another role is left unused and `None` is
    /// returned. `via`: the edge aggregator the client enrolled through (its roster then lists it).
    pub fn enrol_as(
        &self,
        hash: TokenHash,
        client: Fingerprint,
        now: u64,
        only: Option<ClientRole>,
        via: Option<Fingerprint>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        let trees = (
            &self.tokens,
            &self.clients,
            &self.token_roles,
            &self.roles,
            &self.via,
        );
        let r = trees.transaction(|(tokens, clients, token_roles, roles, vias)| {
            let role = ClientRole::from_stored(token_roles.get(hash.0 .0)?);
            if only.is_some_and(|o| o != role) {
                return Ok(None);
            }
            let Some(raw) = tokens.remove(&hash.0 .0)? else {
                return Ok(None);
            };
            token_roles.remove(&hash.0 .0)?;
            if role != ClientRole::Device {
                roles.insert(&client.0, &[role.byte()])?;
            }
            let pending: PendingToken =
                decode(&raw, "token").map_err(ConflictableTransactionError::Abort)?;
            if let Some(existing) = clients.get(client.0)? {
                let rec: ClientRecord =
                    decode(&existing, "client").map_err(ConflictableTransactionError::Abort)?;
                if rec.status == ClientStatus::Revoked {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                        "a revoked key cannot enrol again".into(),
                    )));
                }
            }
            let rec = ClientRecord {
                fingerprint: client,
                name: pending.name,
                status: ClientStatus::Active,
                enrolled_at: now,
                last_seen: now,
                declines: 0,
                last_decline: None,
            };
            clients.insert(&client.0, encode(&rec))?;
            if let Some(a) = via {
                vias.insert(&client.0, &a.0)?;
            }
            Ok(Some(rec))
        })?;
        self.flush()?;
        Ok(r)
    }

    /// The edge aggregator `fp` enrolled through, if it did.
    pub fn enrolled_via(&self, fp: &Fingerprint) -> Result<Option<Fingerprint>, StoreError> {
        self.via
            .get(fp.0)?
            .map(|v| {
                <[u8; 32]>::try_from(v.as_ref())
                    .map(Fingerprint)
                    .map_err(|_| StoreError::Corrupt {
                        what: "enrolling aggregator",
                        detail: format!("{} bytes", v.len()),
                    })
            })
            .transpose()
    }

    /// A client's record.
    pub fn client(&self, fp: &Fingerprint) -> Result<Option<ClientRecord>, StoreError> {
        self.clients
            .get(fp.0)?
            .map(|v| decode(&v, "client"))
            .transpose()
    }

    /// Every client, in fingerprint order.
    pub fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        self.clients
            .iter()
            .map(|kv| decode(&kv?.1, "client"))
            .collect()
    }

    /// Revokes a client; `false` if unknown.
    pub fn revoke(&self, fp: &Fingerprint) -> Result<bool, StoreError> {
        if self
            .update_client(fp, |rec| rec.status = ClientStatus::Revoked)?
            .is_none()
        {
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    /// Applies `change` to a client's record atomically; `None` if the client is unknown.
    ///
    /// A compare-and-swap: when another writer changed the record between the read and the write (a
    /// revocation racing a device's request, both served at once), the record is read again and
    /// `change` applied to the new one. A plain read-modify-write would let the slower writer put back
    /// the record it read, undoing the other's change — a revoked device would stay active.
    fn update_client(
        &self,
        fp: &Fingerprint,
        mut change: impl FnMut(&mut ClientRecord),
    ) -> Result<Option<ClientRecord>, StoreError> {
        loop {
            let Some(old) = self.clients.get(fp.0)? else {
                return Ok(None);
            };
            let mut rec: ClientRecord = decode(&old, "client")?;
            change(&mut rec);
            if self
                .clients
                .compare_and_swap(fp.0, Some(old), Some(encode(&rec)))?
                .is_ok()
            {
                return Ok(Some(rec));
            }
        }
    }

    /// Records that a client declined a round's task (flushed: the operator's record of it must survive).
    pub fn record_decline(
        &self,
        fp: &Fingerprint,
        decline: DeclineRecord,
    ) -> Result<(), StoreError> {
        let updated = self.update_client(fp, |rec| {
            rec.declines += 1;
            rec.last_decline = Some(decline.clone());
        })?;
        if updated.is_some() {
            self.flush()?;
        }
        Ok(())
    }

    /// Notes a client's activity at `now` (not flushed: losing it costs nothing).
    ///
    /// `last_seen` only moves forward, with a resolution of [`SEEN_RESOLUTION_MS`]: a request within
    /// that time of the value this process last wrote changes nothing, so a device's every request (a population
    /// polling for tasks) is not a read, decode, encode and write of its record.
    pub fn touch(&self, fp: &Fingerprint, now: u64) -> Result<(), StoreError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen
            .get(fp)
            .is_some_and(|&at| now < at.saturating_add(SEEN_RESOLUTION_MS))
        {
            return Ok(());
        }
        drop(seen);
        // The latest of the requests: two served at once may write out of order.
        if let Some(rec) = self.update_client(fp, |rec| rec.last_seen = rec.last_seen.max(now))? {
            seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(*fp, rec.last_seen);
        }
        Ok(())
    }

    // ---- rounds and updates ----

    /// Records that the serving coordinator was alive at `now` (not flushed: sled writes it back within its
    /// flush interval, and a restart reads the last value written back as the start of its downtime).
    pub fn mark_alive(&self, now: u64) -> Result<(), StoreError> {
        self.meta.insert("alive_at", &now.to_be_bytes())?;
        Ok(())
    }

    /// When a serving coordinator last recorded itself alive.
    pub fn alive_at(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.meta.get("alive_at")?.map(|v| be_u64(&v)))
    }

    /// Persists whether the operator paused rounds (flushed: a restart keeps them paused).
    pub fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.meta.insert("paused", &[u8::from(paused)])?;
        self.flush()
    }

    /// Whether the operator paused rounds.
    pub fn paused(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get("paused")?.is_some_and(|v| v.as_ref() == [1]))
    }

    /// Persists the round settings the operator set on a running coordinator (flushed); they override
    /// coordinator.toml's `[rounds]` until cleared.
    pub fn set_round_settings(
        &self,
        settings: Option<&crate::engine::EngineConfig>,
    ) -> Result<(), StoreError> {
        match settings {
            Some(s) => self.meta.insert("round_settings", encode(s))?,
            None => self.meta.remove("round_settings")?,
        };
        self.flush()
    }

    /// The round settings the operator set, if any.
    pub fn round_settings(&self) -> Result<Option<crate::engine::EngineConfig>, StoreError> {
        self.meta
            .get("round_settings")?
            .map(|v| decode(&v, "round settings"))
            .transpose()
    }

    /// Every tree's entries, read in one pass for a backup: (tree name, key/value pairs).
    pub fn snapshot(&self) -> Result<Vec<TreeDump>, StoreError> {
        let mut out = Vec::new();
        for name in TREES {
            let tree = self.db.open_tree(name)?;
            let mut kv = Vec::new();
            for entry in tree.iter() {
                let (k, v) = entry?;
                kv.push((k.to_vec(), v.to_vec()));
            }
            out.push((name.to_string(), kv));
        }
        Ok(out)
    }

    /// Creates a store in `dir` from a [`Store::snapshot`] (the directory must hold none).
    pub fn restore(dir: &Path, snapshot: &[TreeDump]) -> Result<Self, StoreError> {
        if dir.join("db").exists() || dir.join("conf").exists() {
            return Err(StoreError::Format(format!(
                "{} already holds a store",
                dir.display()
            )));
        }
        let s = Self::open_db(dir)?;
        for (name, kv) in snapshot {
            if !TREES.contains(&name.as_str()) {
                return Err(StoreError::Format(format!(
                    "unknown tree {name:?} in the backup"
                )));
            }
            let tree = s.db.open_tree(name)?;
            for (k, v) in kv {
                tree.insert(k.as_slice(), v.as_slice())?;
            }
        }
        match s.meta.get("format")? {
            Some(v) if v.as_ref() == FORMAT.to_be_bytes() => {}
            _ => {
                return Err(StoreError::Format(
                    "the backup holds no store of this format".into(),
                ))
            }
        }
        s.flush()?;
        Ok(s)
    }

    /// Persists a round (and the next unused round id), flushed.
    pub fn put_round(&self, round: &RoundRecord) -> Result<(), StoreError> {
        (&self.rounds, &self.meta).transaction(|(rounds, meta)| {
            rounds.insert(&round.id.0.to_be_bytes(), encode(round))?;
            meta.insert("next_round", &(round.id.0 + 1).to_be_bytes())?;
            meta.insert("current_round", &round.id.0.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// The round that was open when the store was last written, if any.
    pub fn current_round(&self) -> Result<Option<RoundRecord>, StoreError> {
        let Some(id) = self.meta.get("current_round")? else {
            return Ok(None);
        };
        let Some(raw) = self.rounds.get(id)? else {
            return Ok(None);
        };
        decode(&raw, "round").map(Some)
    }

    /// Closes the current round without a model (abandoned), flushed.
    pub fn close_round(&self) -> Result<(), StoreError> {
        self.meta.transaction(|meta| {
            meta.remove("current_round")?;
            meta.remove("secagg")?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// Stores the open round's secure-aggregation state (flushed) — call after every change and before
    /// answering the device whose message changed it.
    pub fn put_secagg(&self, round: RoundId, state: &SecAggRound) -> Result<(), StoreError> {
        self.meta.insert("secagg", encode(&(round, state)))?;
        self.flush()
    }

    /// The secure-aggregation state stored for `round`, if any.
    pub fn secagg(&self, round: RoundId) -> Result<Option<SecAggRound>, StoreError> {
        let Some(raw) = self.meta.get("secagg")? else {
            return Ok(None);
        };
        let (r, state): (RoundId, SecAggRound) = decode(&raw, "secure-aggregation state")?;
        Ok((r == round).then_some(state))
    }

    /// The first unused round id.
    pub fn next_round(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get("next_round")?.map_or(1, |v| be_u64(&v)))
    }

    /// Stores an update durably (flushed) — call before acknowledging it.
    pub fn put_update(&self, update: &StoredUpdate) -> Result<(), StoreError> {
        let key = update_key(update.meta.round, &update.meta.update_id);
        (&self.updates, &self.update_index).transaction(|(updates, index)| {
            updates.insert(key.clone(), encode(update))?;
            index.insert(&update.meta.update_id.0, &update.meta.round.0.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// The round an update id was stored for, if it ever was (for re-acknowledging retries of closed rounds).
    pub fn update_round(&self, id: &UpdateId) -> Result<Option<RoundId>, StoreError> {
        Ok(self.update_index.get(id.0)?.map(|v| RoundId(be_u64(&v))))
    }

    /// Every update stored for a round, in update-id order.
    pub fn updates(&self, round: RoundId) -> Result<Vec<StoredUpdate>, StoreError> {
        self.updates
            .scan_prefix(round.0.to_be_bytes())
            .map(|kv| decode(&kv?.1, "update"))
            .collect()
    }

    /// Stores an aggregator's partial sum durably (flushed) — call before acknowledging it.
    pub fn put_partial(&self, partial: &StoredPartial) -> Result<(), StoreError> {
        let key = update_key(partial.meta.round, &partial.meta.update_id);
        (&self.partials, &self.update_index).transaction(|(partials, index)| {
            partials.insert(key.clone(), encode(partial))?;
            index.insert(
                &partial.meta.update_id.0,
                &partial.meta.round.0.to_be_bytes(),
            )?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// Every partial sum stored for a round, in update-id order.
    pub fn partials(&self, round: RoundId) -> Result<Vec<StoredPartial>, StoreError> {
        self.partials
            .scan_prefix(round.0.to_be_bytes())
            .map(|kv| decode(&kv?.1, "partial sum"))
            .collect()
    }

    /// Drops the stored deltas and partial sums of a finished or abandoned round (their ids stay indexed).
    pub fn prune_updates(&self, round: RoundId) -> Result<(), StoreError> {
        for tree in [&self.updates, &self.partials] {
            for kv in tree.scan_prefix(round.0.to_be_bytes()) {
                tree.remove(kv?.0)?;
            }
        }
        Ok(())
    }

    /// Drops the stored deltas of every round but `current` (left behind by a crash between publishing or
    /// abandoning a round and pruning it); returns how many were dropped.
    pub fn prune_stale_updates(&self, current: Option<RoundId>) -> Result<usize, StoreError> {
        let keep = current.map(|r| r.0.to_be_bytes());
        let mut dropped = 0;
        for tree in [&self.updates, &self.partials] {
            for kv in tree.iter() {
                let key = kv?.0;
                if keep.is_some_and(|k| key.starts_with(&k)) {
                    continue;
                }
                tree.remove(key)?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.flush()?;
        }
        Ok(dropped)
    }

    /// How many updates are stored for a round (without reading them).
    pub fn update_count(&self, round: RoundId) -> usize {
        self.updates.scan_prefix(round.0.to_be_bytes()).count()
    }

    // ---- models, strategy state, ledger ----

    /// Publishes a version atomically: the model, the round's ledger charge (with its distributed
    /// discrete Gaussian event, for a secure round with device noise), the strategy state, the closing of
    /// the round and the completed-round count, in one transaction, flushed.
    pub fn publish(
        &self,
        version: ModelVersion,
        model: &PublishedModel,
        round: Option<(RoundId, RoundCharge)>,
        ddg: Option<&DdgEvent>,
        state: &StrategyState,
    ) -> Result<(), StoreError> {
        (&self.models, &self.ledger, &self.meta, &self.ledger_ddg).transaction(
            |(models, ledger, meta, ledger_ddg)| {
                let key = version.0.to_be_bytes();
                if models.get(key)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                        format!("version {} is already published", version.0),
                    )));
                }
                models.insert(&key, encode(model))?;
                meta.insert("latest_version", &key)?;
                meta.insert("strategy_state", encode(state))?;
                if let Some((r, charge)) = round {
                    ledger.insert(&r.0.to_be_bytes(), encode(&charge))?;
                    if let Some(e) = ddg {
                        ledger_ddg.insert(&r.0.to_be_bytes(), encode(e))?;
                    }
                    let completed = meta.get("completed")?.map_or(0, |v| be_u64(&v)) + 1;
                    meta.insert("completed", &completed.to_be_bytes())?;
                    meta.remove("current_round")?;
                    meta.remove("secagg")?;
                }
                Ok(())
            },
        )?;
        self.flush()
    }

    /// The newest published version.
    pub fn latest_version(&self) -> Result<Option<ModelVersion>, StoreError> {
        Ok(self
            .meta
            .get("latest_version")?
            .map(|v| ModelVersion(be_u64(&v))))
    }

    /// A published model.
    pub fn model(&self, version: ModelVersion) -> Result<Option<PublishedModel>, StoreError> {
        self.models
            .get(version.0.to_be_bytes())?
            .map(|v| decode(&v, "model"))
            .transpose()
    }

    /// Rounds aggregated so far.
    pub fn completed(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get("completed")?.map_or(0, |v| be_u64(&v)))
    }

    /// The strategy state saved with the newest version.
    pub fn strategy_state(&self) -> Result<StrategyState, StoreError> {
        self.meta
            .get("strategy_state")?
            .map_or(Ok(StrategyState::default()), |v| {
                decode(&v, "strategy state")
            })
    }

    /// Every round's privacy charge, in round order.
    pub fn ledger(&self) -> Result<Vec<(RoundId, RoundCharge)>, StoreError> {
        by_round(&self.ledger, "ledger entry")
    }

    /// Stores the global privacy ledger's checkpoint (not flushed: it only saves a restart time, and one
    /// older than the ledger's last rounds is resumed from all the same).
    pub fn put_ledger_checkpoint(
        &self,
        checkpoint: &starling_privacy::Checkpoint,
    ) -> Result<(), StoreError> {
        self.meta.insert("ledger_checkpoint", encode(checkpoint))?;
        Ok(())
    }

    /// The global privacy ledger's stored checkpoint, if one was.
    pub fn ledger_checkpoint(&self) -> Result<Option<starling_privacy::Checkpoint>, StoreError> {
        self.meta
            .get("ledger_checkpoint")?
            .map(|v| decode(&v, "ledger checkpoint"))
            .transpose()
    }

    /// The distributed discrete Gaussian events charged, by round.
    pub fn ledger_ddg(&self) -> Result<Vec<(RoundId, DdgEvent)>, StoreError> {
        by_round(&self.ledger_ddg, "discrete Gaussian ledger entry")
    }

    /// Digest of a published version's manifest body (what its child names as parent).
    pub fn manifest_digest(&self, version: ModelVersion) -> Result<Option<Digest>, StoreError> {
        Ok(self.model(version)?.map(|m| m.manifest.digest()))
    }
}

/// The manifest inside a signed manifest this coordinator wrote itself (no signature check needed: the
/// store is trusted, its bytes came from our own signing).
pub fn manifest_body(signed: &SignedManifest) -> Result<starling_protocol::Manifest, StoreError> {
    bincode::serde::decode_from_slice(
        &signed.body,
        bincode::config::standard()
            .with_little_endian()
            .with_fixed_int_encoding(),
    )
    .map(|(m, _)| m)
    .map_err(|e| StoreError::Corrupt {
        what: "manifest",
        detail: e.to_string(),
    })
}

/// Every value of a tree keyed by round id, decoded, in round order.
fn by_round<T: DeserializeOwned>(
    tree: &sled::Tree,
    what: &'static str,
) -> Result<Vec<(RoundId, T)>, StoreError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            Ok((RoundId(be_u64(&k)), decode(&v, what)?))
        })
        .collect()
}

fn be_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[8 - n..].copy_from_slice(&v[v.len() - n..]);
    u64::from_be_bytes(b)
}

/// Opens the sled database in `dir` (the store's, an aggregator's spool). A database closed a moment ago
/// in this process (a restart, a test reopening it) can still be locked by sled's flusher thread; this
/// waits up to 5 s for it rather than fail. A database really in use stays an error.
pub fn open_sled(dir: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RoundPhase;

    fn fp(i: u8) -> Fingerprint {
        Fingerprint([i; 32])
    }

    fn update(round: u64, id: u8) -> StoredUpdate {
        StoredUpdate {
            meta: UpdateMeta {
                update_id: UpdateId([id; 16]),
                client: fp(id),
                round: RoundId(round),
                model_version: ModelVersion(0),
                schema: Digest::of(b"s"),
                num_examples: 3,
            },
            train_loss: 1.5,
            body: vec![id; 10],
        }
    }

    fn enrolled(s: &Store, id: u8, now: u64) {
        let (tok, hash) = starling_protocol::EnrolmentToken::generate().unwrap();
        let token = PendingToken {
            name: format!("device-{id}"),
            created_at: now,
        };
        s.add_token(hash, &token).unwrap();
        assert!(s.enrol(tok.hash(), fp(id), now).unwrap().is_some());
    }

    #[test]
    fn requests_served_during_a_revocation_never_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path()).unwrap();
        enrolled(&s, 1, 0);
        // Devices' requests touch the record (each a minute after the last, so each one writes) and
        // record declines while the operator revokes it.
        let served = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..3u64 {
                let (s, served) = (&s, &served);
                scope.spawn(move || {
                    for i in 0..300u64 {
                        let now = (i * 3 + t + 1) * SEEN_RESOLUTION_MS;
                        s.touch(&fp(1), now).unwrap();
                        served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i % 50 == 0 {
                            let decline = DeclineRecord {
                                round: RoundId(i),
                                code: "BudgetExhausted".into(),
                                reason: "spent".into(),
                                at: now,
                            };
                            s.record_decline(&fp(1), decline).unwrap();
                        }
                    }
                });
            }
            // Revoked while the requests are being served.
            while served.load(std::sync::atomic::Ordering::SeqCst) < 150 {
                std::thread::yield_now();
            }
            assert!(s.revoke(&fp(1)).unwrap());
        });
        let rec = s.client(&fp(1)).unwrap().unwrap();
        assert_eq!(
            rec.status,
            ClientStatus::Revoked,
            "a touch undid the revocation"
        );
        assert_eq!(rec.declines, 18, "every decline is counted");
        assert_eq!(rec.last_seen, 900 * SEEN_RESOLUTION_MS);
    }

    #[test]
    fn the_ledger_checkpoint_reads_back_after_reopening() {
        use starling_privacy::{AccountantKind, Budget, DpEvent, Ledger, LedgerScope};
        let dir = tempfile::tempdir().unwrap();
        let budget = Budget {
            epsilon: 100.0,
            delta: 1e-5,
        };
        let mut l = Ledger::new(LedgerScope::Global, budget, AccountantKind::Pld).unwrap();
        for q in [0.01, 0.02] {
            l.charge("round", DpEvent::new(q, 1.0, 1).unwrap()).unwrap();
        }
        let cp = l.checkpoint().unwrap().unwrap();
        assert!(!cp.before.is_empty());
        {
            let s = Store::create(dir.path()).unwrap();
            assert_eq!(s.ledger_checkpoint().unwrap(), None);
            s.put_ledger_checkpoint(&cp).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.ledger_checkpoint().unwrap(), Some(cp));
    }

    #[test]
    fn last_seen_is_written_once_a_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path()).unwrap();
        enrolled(&s, 1, 1_000);
        s.touch(&fp(1), 2_000).unwrap();
        assert_eq!(s.client(&fp(1)).unwrap().unwrap().last_seen, 2_000);
        s.touch(&fp(1), 2_000 + SEEN_RESOLUTION_MS - 1).unwrap();
        assert_eq!(s.client(&fp(1)).unwrap().unwrap().last_seen, 2_000);
        s.touch(&fp(1), 2_000 + SEEN_RESOLUTION_MS).unwrap();
        let at = 2_000 + SEEN_RESOLUTION_MS;
        assert_eq!(s.client(&fp(1)).unwrap().unwrap().last_seen, at);
        // Requests served out of order (or a clock set back) never move it back.
        s.touch(&fp(1), 500).unwrap();
        assert_eq!(s.client(&fp(1)).unwrap().unwrap().last_seen, at);
        // An unknown key is neither written nor remembered.
        s.touch(&fp(9), 5_000).unwrap();
        assert!(s.client(&fp(9)).unwrap().is_none());
        assert!(!s.seen.lock().unwrap().contains_key(&fp(9)));
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::create(dir.path()).unwrap();
            let (tok, hash) = starling_protocol::EnrolmentToken::generate().unwrap();
            s.add_token(
                hash,
                &PendingToken {
                    name: "pi".into(),
                    created_at: 1,
                },
            )
            .unwrap();
            assert!(s.enrol(tok.hash(), fp(1), 2).unwrap().is_some());
            assert!(
                s.enrol(tok.hash(), fp(2), 3).unwrap().is_none(),
                "tokens are single-use"
            );
            let round = RoundRecord {
                id: RoundId(4),
                model_version: ModelVersion(0),
                selected: vec![fp(1)],
                started_at: 0,
                deadline: 10,
                phase: RoundPhase::Collecting,
                eligible: 1,
            };
            s.put_round(&round).unwrap();
            s.put_update(&update(4, 1)).unwrap();
            s.put_update(&update(4, 2)).unwrap();
            s.put_update(&update(5, 3)).unwrap();
            assert!(Store::create(dir.path()).is_err());
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.clients().unwrap().len(), 1);
        assert_eq!(s.current_round().unwrap().unwrap().id, RoundId(4));
        assert_eq!(s.next_round().unwrap(), 5);
        let ups = s.updates(RoundId(4)).unwrap();
        assert_eq!(ups, vec![update(4, 1), update(4, 2)]);
        assert_eq!(
            s.update_round(&UpdateId([3; 16])).unwrap(),
            Some(RoundId(5))
        );
        assert!(s.revoke(&fp(1)).unwrap());
        assert_eq!(
            s.client(&fp(1)).unwrap().unwrap().status,
            ClientStatus::Revoked
        );
        assert!(!s.revoke(&fp(9)).unwrap());
        s.prune_updates(RoundId(4)).unwrap();
        assert!(s.updates(RoundId(4)).unwrap().is_empty());
        assert_eq!(
            s.update_round(&UpdateId([1; 16])).unwrap(),
            Some(RoundId(4))
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open(empty.path()),
            Err(StoreError::Format(_))
        ));
    }

    #[test]
    fn publishing_is_atomic_and_refuses_a_second_copy_of_a_version() {
        let dir = tempfile::tempdir().unwrap();
        let key = starling_protocol::SigningIdentity::from_seed([1; 32]);
        let manifest = starling_protocol::Manifest {
            version: ModelVersion(1),
            parent_digest: None,
            base_digest: Digest::of(b"b"),
            adapter_digest: Digest::of(b"a"),
            adapter_schema: starling_protocol::AdapterSchema::new(vec![
                starling_protocol::TensorSpec {
                    name: "t".into(),
                    shape: vec![1],
                },
            ])
            .unwrap(),
            round: RoundId(3),
            strategy: "fedavg".into(),
            dp: starling_protocol::DpRecord {
                mode: starling_protocol::DpMode::Off,
                noise_multiplier: 0.0,
                clip: 0.0,
                epsilon_spent: 0.0,
                delta: 0.0,
            },
            created_at_unix_ms: 9,
        };
        let model = PublishedModel {
            manifest: manifest.sign(&key),
            adapter: vec![0, 0, 128, 63],
        };
        let charge = RoundCharge {
            sampling_rate: 0.5,
            noise_multiplier: 1.0,
            epsilon_after: 0.3,
            mean_train_loss: 2.0,
            updates: 4,
        };
        let state = StrategyState {
            rounds: 1,
            vectors: vec![("m".into(), vec![0.5])],
        };
        let ddg = DdgEvent::new(4, 5120.0, 10240.0, 100, 0.25, 1).unwrap();
        {
            let s = Store::create(dir.path()).unwrap();
            let round = RoundRecord {
                id: RoundId(3),
                model_version: ModelVersion(0),
                selected: vec![],
                started_at: 0,
                deadline: 1,
                phase: crate::engine::RoundPhase::Aggregating,
                eligible: 0,
            };
            s.put_round(&round).unwrap();
            s.publish(
                ModelVersion(1),
                &model,
                Some((RoundId(3), charge)),
                Some(&ddg),
                &state,
            )
            .unwrap();
            assert!(matches!(
                s.publish(ModelVersion(1), &model, None, None, &state),
                Err(StoreError::Conflict(_))
            ));
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.latest_version().unwrap(), Some(ModelVersion(1)));
        assert_eq!(s.model(ModelVersion(1)).unwrap().unwrap(), model);
        assert_eq!(manifest_body(&model.manifest).unwrap(), manifest);
        assert_eq!(
            s.current_round().unwrap(),
            None,
            "publishing closes the round in the same transaction"
        );
        assert_eq!(s.completed().unwrap(), 1);
        assert_eq!(s.strategy_state().unwrap(), state);
        assert_eq!(s.ledger().unwrap(), vec![(RoundId(3), charge)]);
        assert_eq!(s.ledger_ddg().unwrap(), vec![(RoundId(3), ddg)]);
        assert_eq!(
            s.manifest_digest(ModelVersion(1)).unwrap(),
            Some(model.manifest.digest())
        );
    }
}
