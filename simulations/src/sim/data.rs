//! The clients' text: the Shakespeare corpus parsed into speeches (who says what, in which play) and dealt
//! to clients LEAF-style (one client per play and speaking role), IID, or by Dirichlet(α) over plays; or
//! the user's own folder with one sub-folder or file per client. Every client's text is split by order
//! into a training part and a test part (the last `test_fraction` of its lines).
//!
//! All text lives once in [`Dataset::text`]; a client is two byte ranges into it, so a virtual client
//! costs a few words however many there are. What must never live here: tokenization policy or training.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::scenario::{DataConfig, Dataset as Kind, Partition, Works};
use super::SimError;

/// One client's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientData {
    /// Where it comes from (`play/ROLE`, a folder name, or `iid-17`).
    pub name: String,
    /// Its training text, a range of [`Dataset::text`].
    pub train: Range<usize>,
    /// Its test text, a range of [`Dataset::text`].
    pub test: Range<usize>,
}

/// Every client's text.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// All clients' text, back to back.
    pub text: String,
    /// The clients.
    pub clients: Vec<ClientData>,
    /// The texts are chat conversations (JSONL lines: the folder data set of `*.jsonl` files),
    /// trained and scored on their assistant turns only.
    pub chat: bool,
}

impl Dataset {
    /// The ids of one of its texts: tokenized plain text, or conversations rendered with the model's
    /// chat template (`chat`), every token but the assistant turns' marked
    /// [`starling_model::data::NO_LOSS`].
    pub fn encode(
        &self,
        text: &str,
        tok: &starling_model::Tokenizer,
        chat: Option<&starling_model::chat::ChatTemplate>,
    ) -> Result<Vec<u32>, SimError> {
        starling_model::data::training_ids(text, Path::new("client data"), tok, self.chat, chat)
            .map_err(|e| SimError::Data(e.to_string()))
    }

    /// A client's training text.
    pub fn train(&self, client: usize) -> &str {
        self.clients
            .get(client)
            .and_then(|c| self.text.get(c.train.clone()))
            .unwrap_or("")
    }

    /// A client's test text.
    pub fn test(&self, client: usize) -> &str {
        self.clients
            .get(client)
            .and_then(|c| self.text.get(c.test.clone()))
            .unwrap_or("")
    }

    /// The union of every client's training text (the centralized baseline's data).
    pub fn union_train(&self) -> String {
        let mut s = String::new();
        for i in 0..self.clients.len() {
            s.push_str(self.train(i));
        }
        s
    }

    fn push(&mut self, name: String, lines: &[&str], test_fraction: f64) {
        let n = lines.len();
        let cut = ((n as f64) * (1.0 - test_fraction)).round() as usize;
        let cut = cut.clamp(1.min(n), n.saturating_sub(1).max(1.min(n)));
        self.push_split(name, &lines[..cut], &lines[cut..]);
    }

    /// A client whose training and test lines are given apart.
    fn push_split(&mut self, name: String, train: &[&str], test: &[&str]) {
        let start = self.text.len();
        for l in train {
            self.text.push_str(l);
            self.text.push('\n');
        }
        let mid = self.text.len();
        for l in test {
            self.text.push_str(l);
            self.text.push('\n');
        }
        self.clients.push(ClientData {
            name,
            train: start..mid,
            test: mid..self.text.len(),
        });
    }
}

/// One speech (or, in the poems, one stanza): a unit of text with its speaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speech {
    /// The work's file stem.
    pub work: String,
    /// The speaker (upper case), or `None` for verse without speakers.
    pub role: Option<String>,
    /// Its lines.
    pub lines: Vec<String>,
}

const SMALL_WORDS: [&str; 8] = ["and", "of", "the", "to", "de", "la", "le", "du"];

fn is_heading(s: &str) -> bool {
    let u = s.to_ascii_uppercase();
    ["ACT ", "SCENE", "EPILOGUE", "PROLOGUE", "INDUCTION"]
        .iter()
        .any(|h| u.starts_with(h))
}

/// Whether a paragraph's first line names its speaker ("HAMLET.", "Lady Montague.", "Alb. and Corn.",
/// "HELENA").
fn speaker(line: &str) -> Option<String> {
    let s = line.trim();
    if s.is_empty() || s.len() > 40 || !s.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    if is_heading(s) {
        return None;
    }
    let body = s.strip_suffix('.').unwrap_or(s);
    if !s.ends_with('.') && body != body.to_ascii_uppercase() {
        return None;
    }
    if !body
        .chars()
        .all(|c| c.is_ascii_alphabetic() || " '-&.".contains(c))
    {
        return None;
    }
    let words: Vec<&str> = body.split([' ', '.']).filter(|w| !w.is_empty()).collect();
    if words.is_empty() || words.len() > 4 {
        return None;
    }
    words
        .iter()
        .all(|w| w.starts_with(|c: char| c.is_ascii_uppercase()) || SMALL_WORDS.contains(w))
        .then(|| body.to_ascii_uppercase())
}

/// The speeches of a play (from its first act on); stage directions are left out. A work without acts
/// (the poems) gives its stanzas, without speakers.
pub fn speeches(work: &str, text: &str) -> Vec<Speech> {
    let lines: Vec<&str> = text.lines().collect();
    let act = lines.iter().position(|l| {
        let t = l.trim_start();
        (t.starts_with("ACT ") || t.starts_with("Act "))
            && t[4..].starts_with(|c: char| "IVX1".contains(c))
    });
    let mut out = Vec::new();
    let Some(start) = act else {
        let mut cur = Vec::new();
        for l in &lines {
            if l.trim().is_empty() {
                if !cur.is_empty() {
                    out.push(Speech {
                        work: work.into(),
                        role: None,
                        lines: std::mem::take(&mut cur),
                    });
                }
            } else {
                cur.push(l.trim().to_string());
            }
        }
        if !cur.is_empty() {
            out.push(Speech {
                work: work.into(),
                role: None,
                lines: cur,
            });
        }
        return out;
    };
    let mut role: Option<String> = None;
    let mut cur: Vec<String> = Vec::new();
    let mut paragraph_start = true;
    let flush = |out: &mut Vec<Speech>, role: &Option<String>, cur: &mut Vec<String>| {
        if let (Some(r), false) = (role, cur.is_empty()) {
            out.push(Speech {
                work: work.into(),
                role: Some(r.clone()),
                lines: std::mem::take(cur),
            });
        }
        cur.clear();
    };
    for l in &lines[start..] {
        let s = l.trim();
        if s.is_empty() {
            paragraph_start = true;
            continue;
        }
        if is_heading(s) {
            flush(&mut out, &role, &mut cur);
            role = None;
            paragraph_start = true;
            continue;
        }
        if paragraph_start {
            paragraph_start = false;
            if let Some(r) = speaker(s) {
                flush(&mut out, &role, &mut cur);
                role = Some(r);
                continue;
            }
        }
        if s.starts_with('[') {
            continue;
        }
        if role.is_some() {
            cur.push(s.to_string());
        }
    }
    flush(&mut out, &role, &mut cur);
    out
}

/// The works listed in `dir/HELD_OUT` (the base model never saw them).
pub fn held_out(dir: &Path) -> Result<Vec<String>, SimError> {
    let path = dir.join("HELD_OUT");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| SimError::Data(format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

fn corpus(cfg: &DataConfig, dir: &Path) -> Result<Vec<Speech>, SimError> {
    let files: Vec<String> = match cfg.works {
        Works::HeldOut => held_out(dir)?,
        Works::All => {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| SimError::Data(format!("{}: {e}", dir.display())))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".txt"))
                .collect();
            v.sort();
            v
        }
    };
    let mut all = Vec::new();
    for f in files {
        let path = dir.join(&f);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SimError::Data(format!("{}: {e}", path.display())))?;
        all.extend(speeches(f.trim_end_matches(".txt"), &text));
    }
    if all.is_empty() {
        return Err(SimError::Data(format!(
            "no text found in {}",
            dir.display()
        )));
    }
    Ok(all)
}

/// Loads and partitions the data set of `cfg` (`dir` is `cfg.path` resolved).
pub fn load(cfg: &DataConfig, dir: &Path, seed: u64) -> Result<Dataset, SimError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xDA7A);
    let mut ds = Dataset::default();
    match cfg.partition {
        Partition::Folders => folders(cfg, dir, &mut ds)?,
        Partition::Roles => {
            let all = corpus(cfg, dir)?;
            // (work, role) in order of first appearance; a client's lines in play order.
            let mut order: Vec<(String, String)> = Vec::new();
            let mut lines: std::collections::HashMap<(String, String), Vec<&str>> =
                std::collections::HashMap::new();
            for s in &all {
                let Some(r) = &s.role else { continue };
                let key = (s.work.clone(), r.clone());
                let e = lines.entry(key.clone()).or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                });
                e.extend(s.lines.iter().map(String::as_str));
            }
            let mut kept: Vec<&(String, String)> = order
                .iter()
                .filter(|k| lines[*k].iter().map(|l| l.len() + 1).sum::<usize>() >= cfg.min_bytes)
                .filter(|k| lines[*k].len() >= 2)
                .collect();
            if cfg.clients > 0 && kept.len() > cfg.clients {
                kept.shuffle(&mut rng);
                kept.truncate(cfg.clients);
                kept.sort();
            }
            for k in kept {
                ds.push(format!("{}/{}", k.0, k.1), &lines[k], cfg.test_fraction);
            }
        }
        Partition::Sampled => {
            // Speeches are drawn by many clients, so a client's test text must come from speeches no
            // client trains on: the corpus is split once into a training pool and a test pool
            // (`test_fraction` of the speeches), and each client draws its text from the one and its test
            // split from the other.
            let all = corpus(cfg, dir)?;
            let mut order: Vec<usize> = (0..all.len()).collect();
            order.shuffle(&mut rng);
            let n_test = ((all.len() as f64) * cfg.test_fraction).round() as usize;
            let (test_pool, train_pool) = order.split_at(n_test.min(all.len()));
            if test_pool.is_empty() || train_pool.is_empty() {
                return Err(SimError::Data(format!(
                    "{} speeches cannot be split into training and test pools",
                    all.len()
                )));
            }
            let k = cfg.speeches_per_client;
            let k_test = ((k as f64) * cfg.test_fraction / (1.0 - cfg.test_fraction))
                .round()
                .max(1.0) as usize;
            let mut draw = |pool: &[usize], n: usize| {
                let mut picks: Vec<usize> = (0..n)
                    .map(|_| pool[rng.random_range(0..pool.len())])
                    .collect();
                // In corpus order, as a person's text would read.
                picks.sort_unstable();
                picks
            };
            for c in 0..cfg.clients {
                let (train, test) = (draw(train_pool, k), draw(test_pool, k_test));
                let lines = |picks: &[usize]| -> Vec<&str> {
                    picks
                        .iter()
                        .flat_map(|&i| all[i].lines.iter().map(String::as_str))
                        .collect()
                };
                let (train, test) = (lines(&train), lines(&test));
                if train.iter().map(|l| l.len() + 1).sum::<usize>() < cfg.min_bytes
                    || train.len() < 2
                {
                    continue;
                }
                ds.push_split(format!("client-{c}"), &train, &test);
            }
        }
        Partition::Iid | Partition::Dirichlet => {
            let mut all = corpus(cfg, dir)?;
            let n = cfg.clients;
            let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); n];
            if cfg.partition == Partition::Iid {
                let mut idx: Vec<usize> = (0..all.len()).collect();
                idx.shuffle(&mut rng);
                for (i, s) in idx.into_iter().enumerate() {
                    buckets[i % n].push(s);
                }
            } else {
                // Each work's speeches go to clients in proportions drawn from Dirichlet(α).
                let mut works: Vec<String> = all.iter().map(|s| s.work.clone()).collect();
                works.dedup();
                for w in works {
                    let p = dirichlet(&mut rng, n, cfg.alpha);
                    for (i, s) in all.iter().enumerate().filter(|(_, s)| s.work == w) {
                        let _ = s;
                        buckets[categorical(&mut rng, &p)].push(i);
                    }
                }
            }
            for (c, b) in buckets.iter_mut().enumerate() {
                b.sort_unstable();
                let lines: Vec<&str> = b
                    .iter()
                    .flat_map(|&i| all[i].lines.iter().map(String::as_str))
                    .collect();
                if lines.iter().map(|l| l.len() + 1).sum::<usize>() < cfg.min_bytes
                    || lines.len() < 2
                {
                    continue;
                }
                ds.push(format!("client-{c}"), &lines, cfg.test_fraction);
            }
            all.clear();
        }
    }
    if ds.clients.is_empty() {
        return Err(SimError::Data(format!(
            "the partition left no client with at least {} bytes of text",
            cfg.min_bytes
        )));
    }
    Ok(ds)
}

/// Largest text file read for one client of the folder data set.
const MAX_CLIENT_FILE: u64 = 1 << 30;

fn folders(cfg: &DataConfig, dir: &Path, ds: &mut Dataset) -> Result<(), SimError> {
    debug_assert_eq!(cfg.dataset, Kind::Folder);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| SimError::Data(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() || p.extension().is_some_and(|x| x == "txt" || x == "jsonl"))
        .collect();
    entries.sort();
    let mut kind: Option<bool> = None;
    for p in entries {
        if cfg.clients > 0 && ds.clients.len() >= cfg.clients {
            break;
        }
        let files = starling_model::data::text_files(std::slice::from_ref(&p))
            .map_err(|e| SimError::Data(e.to_string()))?;
        // A data set is all chat conversations (one per JSONL line) or all plain text.
        for f in &files {
            let chat = starling_model::data::is_chat(f);
            match kind {
                None => kind = Some(chat),
                Some(k) if k != chat => {
                    return Err(SimError::Data(format!(
                        "{}: a data set mixes chat (.jsonl) and plain text (.txt) files",
                        f.display()
                    )))
                }
                Some(_) => {}
            }
        }
        let mut text = String::new();
        for f in files {
            let bytes = starling_model::io::read_bounded(&f, MAX_CLIENT_FILE)
                .map_err(|e| SimError::Data(e.to_string()))?;
            text.push_str(&String::from_utf8_lossy(&bytes));
            text.push('\n');
        }
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.iter().map(|l| l.len() + 1).sum::<usize>() < cfg.min_bytes || lines.len() < 2 {
            continue;
        }
        let name = p.file_stem().map_or_else(
            || p.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        ds.push(name, &lines, cfg.test_fraction);
    }
    ds.chat = kind.unwrap_or(false);
    Ok(())
}

/// A draw from the symmetric Dirichlet(α) over `n` outcomes (normalized Gamma(α, 1) draws).
fn dirichlet(rng: &mut impl Rng, n: usize, alpha: f64) -> Vec<f64> {
    let g: Vec<f64> = (0..n).map(|_| gamma(rng, alpha)).collect();
    let sum: f64 = g.iter().sum();
    if sum > 0.0 {
        g.into_iter().map(|x| x / sum).collect()
    } else {
        vec![1.0 / n as f64; n]
    }
}

/// A Gamma(α, 1) draw (Marsaglia and Tsang 2000; α < 1 by the boost Gamma(α+1)·U^{1/α}).
fn gamma(rng: &mut impl Rng, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, alpha + 1.0) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal draw (Box–Muller; simulation randomness, not privacy noise).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn categorical(rng: &mut impl Rng, p: &[f64]) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, &x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shakespeare() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shakespeare")
    }

    #[test]
    fn speakers_are_recognised_in_the_corpus_spellings() {
        assert_eq!(speaker("HAMLET."), Some("HAMLET".into()));
        assert_eq!(speaker("Lady Montague."), Some("LADY MONTAGUE".into()));
        assert_eq!(speaker("Alb. and Corn."), Some("ALB. AND CORN".into()));
        assert_eq!(speaker("HELENA"), Some("HELENA".into()));
        assert_eq!(speaker("Do, if it will not stand."), None);
        assert_eq!(speaker("O, speak!"), None);
        assert_eq!(speaker("ACT I."), None);
        assert_eq!(speaker("Speak of it:--stay"), None);
    }

    #[test]
    fn macbeth_speeches_have_their_speakers_and_no_stage_directions() {
        let text = std::fs::read_to_string(shakespeare().join("macbeth.txt")).unwrap();
        let s = speeches("macbeth", &text);
        assert_eq!(s[0].role.as_deref(), Some("FIRST WITCH"));
        assert_eq!(
            s[0].lines,
            vec![
                "When shall we three meet again?",
                "In thunder, lightning, or in rain?"
            ]
        );
        assert!(s
            .iter()
            .all(|x| x.lines.iter().all(|l| !l.starts_with('['))));
        assert!(s.iter().any(|x| x.role.as_deref() == Some("LADY MACBETH")));
    }

    #[test]
    fn leaf_roles_give_several_hundred_clients_split_by_order() {
        let cfg = DataConfig::default();
        let ds = load(&cfg, &shakespeare(), 0).unwrap();
        assert!(ds.clients.len() >= 250, "{} roles", ds.clients.len());
        let hamlet = ds
            .clients
            .iter()
            .position(|c| c.name == "hamlet/HAM")
            .unwrap();
        let (train, test) = (ds.train(hamlet), ds.test(hamlet));
        assert!(train.len() > 4 * test.len() / 2 && !test.is_empty());
        // Split by order: the test part is the end of the role's lines.
        assert!(
            test.contains("the rest is silence."),
            "{}",
            &test[test.len().saturating_sub(300)..]
        );
        assert!(!train.contains("the rest is silence."));
    }

    #[test]
    fn iid_and_dirichlet_partitions_cover_the_text_once() {
        for partition in [Partition::Iid, Partition::Dirichlet] {
            let cfg = DataConfig {
                partition,
                clients: 40,
                min_bytes: 0,
                alpha: 0.3,
                ..DataConfig::default()
            };
            let ds = load(&cfg, &shakespeare(), 1).unwrap();
            let again = load(&cfg, &shakespeare(), 1).unwrap();
            assert_eq!(ds.clients, again.clients, "seeded");
            assert!(ds.clients.len() >= 30);
            let all: usize = speeches_len(&cfg);
            assert_eq!(ds.text.len(), all, "{partition:?}");
        }
    }

    #[test]
    fn a_sampled_population_can_outnumber_the_speeches() {
        let cfg = DataConfig {
            partition: Partition::Sampled,
            works: Works::HeldOut,
            clients: 50_000,
            min_bytes: 0,
            speeches_per_client: 4,
            ..DataConfig::default()
        };
        let speeches = corpus(&cfg, &shakespeare()).unwrap().len();
        assert!(speeches < cfg.clients, "{speeches} speeches");
        let ds = load(&cfg, &shakespeare(), 3).unwrap();
        // Clients of one-line speeches only (four picks, under two lines) are left out: rare.
        assert!(ds.clients.len() > 49_000, "{}", ds.clients.len());
        assert_eq!(
            ds.clients[..100],
            load(&cfg, &shakespeare(), 3).unwrap().clients[..100],
            "seeded"
        );
        assert_ne!(ds.train(0), ds.train(1));
        // No client's test text is any client's training text.
        let trained: std::collections::HashSet<&str> = (0..ds.clients.len())
            .flat_map(|c| ds.train(c).lines())
            .collect();
        for c in 0..200 {
            let test = &ds.text[ds.clients[c].test.clone()];
            assert!(!test.is_empty());
            assert!(
                test.lines()
                    .all(|l| !trained.contains(l) || l.trim().len() < 30),
                "client {c}'s test text is trained on"
            );
        }
    }

    #[test]
    fn a_folder_per_client_is_a_client_per_folder_or_file() {
        let tmp = tempfile::tempdir().unwrap();
        let lines = |n: usize, who: &str| {
            (0..n)
                .map(|i| format!("{who} line {i} of some private text"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        std::fs::create_dir(tmp.path().join("alice")).unwrap();
        std::fs::write(tmp.path().join("alice/a.txt"), lines(20, "alice")).unwrap();
        std::fs::write(tmp.path().join("alice/b.txt"), lines(10, "alice-b")).unwrap();
        std::fs::write(tmp.path().join("bob.txt"), lines(30, "bob")).unwrap();
        std::fs::write(tmp.path().join("tiny.txt"), "too\nshort").unwrap();
        std::fs::write(tmp.path().join("notes.md"), lines(30, "ignored")).unwrap();
        let cfg = DataConfig {
            dataset: Kind::Folder,
            partition: Partition::Folders,
            min_bytes: 100,
            ..DataConfig::default()
        };
        let ds = load(&cfg, tmp.path(), 0).unwrap();
        let names: Vec<&str> = ds.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        // 30 lines of alice: the last 6 (20%) are her test split.
        assert_eq!(ds.test(0).lines().count(), 6);
        assert!(ds.train(0).contains("alice line 0") && ds.test(0).contains("alice-b line 9"));
        assert!(!ds.train(1).contains("alice") && ds.test(1).contains("bob line 29"));
        assert!(load(&cfg, &tmp.path().join("missing"), 0).is_err());
        assert!(!ds.chat);
        // Chat files and plain text in one data set: refused, naming the file.
        std::fs::write(tmp.path().join("carol.jsonl"), lines(30, "carol")).unwrap();
        let e = load(&cfg, tmp.path(), 0).unwrap_err().to_string();
        assert!(e.contains("carol.jsonl") && e.contains("mixes"), "{e}");
    }

    fn speeches_len(cfg: &DataConfig) -> usize {
        corpus(cfg, &shakespeare())
            .unwrap()
            .iter()
            .flat_map(|s| s.lines.iter())
            .map(|l| l.len() + 1)
            .sum()
    }
}
