//! Privacy-loss-distribution accountant for the (Poisson-subsampled) Gaussian mechanism: a port of Google
//! dp_accounting's PLD code path that `PLDAccountant` takes for `PoissonSampledDpEvent(GaussianDpEvent)` —
//! pessimistic "connect the dots" discretisation (Doroshenko et al. 2022), add and remove adjacency kept apart,
//! composition by FFT with pessimistic tail truncation (truncated mass goes to the infinite-loss atom or the
//! lowest bucket, never dropped). Every rounding here errs towards a larger ε, so it never under-reports.
//! Pure arithmetic: nothing random lives here.

use std::sync::OnceLock;

use rustfft::{num_complex::Complex, FftPlanner};

use crate::{special, PrivacyError};

/// dp_accounting's default discretisation of privacy-loss values.
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;
/// The most buckets one step's discretised PMF may take (64 MiB of f64; σ = 0.3665 at q = 0.002 takes
/// 241,007). A multiplier so small that its privacy loss reaches hundreds (σ below 0.03–0.045) is
/// refused with an error rather than exhausting memory; the RDP accountant handles it.
const MAX_BUCKETS: usize = 1 << 23;
/// Tail mass dropped (pessimistically) at each composition (dp_accounting's default).
const TAIL_MASS_TRUNCATION: f64 = 1e-15;
/// ln of the Gaussian noise mass left out of the discretised range (dp_accounting's default).
const LOG_MASS_TRUNCATION_BOUND: f64 = -50.0;

/// A discretised privacy-loss PMF: `probs[i]` is the mass at loss `(lower_loss + i)·discretization`, plus an
/// atom at +∞.
#[derive(Clone, Debug)]
pub struct Pmf {
    discretization: f64,
    lower_loss: i64,
    probs: Vec<f64>,
    infinity_mass: f64,
    /// log Σ_i p_i e^{i·t} at the orders t of [`self_convolve_bounds`], once a self-composition asked:
    /// they do not depend on the number of steps, so a run's rounds compute them once (two thirds of a
    /// self-composition's time at σ ≈ 0.37).
    log_mgfs: OnceLock<Vec<(f64, f64)>>,
}

/// A PLD: the remove-adjacency PMF and, when it differs, the add-adjacency one. ε is the worse of the two.
#[derive(Clone, Debug)]
pub struct Pld {
    remove: Pmf,
    add: Option<Pmf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Adjacency {
    Add,
    Remove,
}

/// log(a·exp(b) + c) (dp_accounting's `log_a_times_exp_b_plus_c`).
fn log_a_exp_b_plus_c(a: f64, b: f64, c: f64) -> f64 {
    if a == 0.0 {
        return c.ln();
    }
    if a < 0.0 {
        return special::log_sub(c.ln(), (-a).ln() + b);
    }
    if b == 0.0 {
        return (a + c).ln();
    }
    let d = b + a.ln();
    if c == 0.0 {
        d
    } else if c < 0.0 {
        special::log_sub(d, (-c).ln())
    } else {
        special::log_add(d, c.ln())
    }
}

fn is_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The privacy loss of the subsampled Gaussian for one adjacency (dp_accounting's `GaussianPrivacyLoss`).
struct GaussianLoss {
    sigma: f64,
    sensitivity: f64,
    q: f64,
    adjacency: Adjacency,
}

impl GaussianLoss {
    fn loss_nosub_remove(&self, x: f64) -> f64 {
        self.sensitivity * (-0.5 * self.sensitivity - x) / (self.sigma * self.sigma)
    }
    fn inverse_nosub_remove(&self, l: f64) -> f64 {
        -0.5 * self.sensitivity - l * self.sigma * self.sigma / self.sensitivity
    }
    fn loss_remove(&self, x: f64) -> f64 {
        let l = self.loss_nosub_remove(x);
        if self.q == 1.0 {
            l
        } else {
            log_a_exp_b_plus_c(self.q, l, 1.0 - self.q)
        }
    }
    fn loss(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.loss_remove(x),
            Adjacency::Add => -self.loss_remove(-x),
        }
    }
    fn inverse(&self, l: f64) -> f64 {
        let q = self.q;
        match self.adjacency {
            Adjacency::Remove => {
                if q == 1.0 {
                    return self.inverse_nosub_remove(l);
                }
                if is_close(l, (1.0 - q).ln()) {
                    return self.inverse_nosub_remove(f64::NEG_INFINITY);
                }
                self.inverse_nosub_remove(log_a_exp_b_plus_c(1.0 / q, l, 1.0 - 1.0 / q))
            }
            Adjacency::Add => {
                let inv_add = |l0: f64| self.sensitivity + self.inverse_nosub_remove(l0);
                if q == 1.0 {
                    return inv_add(l);
                }
                if is_close(l, -(1.0 - q).ln()) {
                    return inv_add(f64::INFINITY);
                }
                inv_add(-log_a_exp_b_plus_c(1.0 / q, -l, 1.0 - 1.0 / q))
            }
        }
    }
    fn mu_upper_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Add => special::ndtr(x / s),
            Adjacency::Remove if self.q == 1.0 => special::ndtr((x + self.sensitivity) / s),
            Adjacency::Remove => {
                (1.0 - self.q) * special::ndtr(x / s)
                    + self.q * special::ndtr((x + self.sensitivity) / s)
            }
        }
    }
    fn mu_lower_log_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Remove => special::log_ndtr(x / s),
            Adjacency::Add if self.q == 1.0 => special::log_ndtr((x - self.sensitivity) / s),
            Adjacency::Add => special::log_add(
                (-self.q).ln_1p() + special::log_ndtr(x / s),
                self.q.ln() + special::log_ndtr((x - self.sensitivity) / s),
            ),
        }
    }
    fn delta_for_epsilon(&self, eps: f64) -> f64 {
        let q = self.q;
        let use_inverse = if q == 1.0 {
            true
        } else {
            match self.adjacency {
                Adjacency::Add => eps < -(-q).ln_1p(),
                Adjacency::Remove => eps > (-q).ln_1p(),
            }
        };
        let delta = if use_inverse {
            let x = self.inverse(eps);
            self.mu_upper_cdf(x) - (eps + self.mu_lower_log_cdf(x)).exp()
        } else if self.adjacency == Adjacency::Remove {
            -eps.exp_m1()
        } else {
            0.0
        };
        delta.clamp(0.0, 1.0)
    }
    /// (ε_lower, ε_upper): the losses at the edges of the noise range kept (mass e^-50 outside it).
    fn connect_dots_bounds(&self) -> (f64, f64) {
        let mut lower_x = self.sigma * special::ndtri_log(0.5f64.ln() + LOG_MASS_TRUNCATION_BOUND);
        let mut upper_x = -lower_x;
        match self.adjacency {
            Adjacency::Add => upper_x += self.sensitivity,
            Adjacency::Remove => lower_x -= self.sensitivity,
        }
        (self.loss(upper_x), self.loss(lower_x))
    }
}

impl Pmf {
    /// The PMF of "no privacy loss": all mass at 0.
    pub fn identity(discretization: f64) -> Self {
        Self {
            discretization,
            lower_loss: 0,
            probs: vec![1.0],
            infinity_mass: 0.0,
            log_mgfs: OnceLock::new(),
        }
    }

    fn connect_dots(loss: &GaussianLoss, d: f64) -> Result<Self, PrivacyError> {
        let (eps_lower, eps_upper) = loss.connect_dots_bounds();
        let buckets = (eps_upper - eps_lower) / d;
        if buckets.is_nan() || buckets >= MAX_BUCKETS as f64 {
            return Err(PrivacyError::PldTooLarge {
                noise_multiplier: loss.sigma,
                buckets,
                max: MAX_BUCKETS,
            });
        }
        let lo = (eps_lower / d).floor() as i64;
        let hi = (eps_upper / d).ceil() as i64;
        let mut deltas: Vec<f64> = (lo..=hi)
            .map(|i| loss.delta_for_epsilon(i as f64 * d))
            .collect();
        if lo == hi {
            return Ok(Self {
                discretization: d,
                lower_loss: lo,
                probs: vec![1.0 - deltas[0]],
                infinity_mass: deltas[0],
                log_mgfs: OnceLock::new(),
            });
        }
        // Running minimum: deltas must be non-increasing (they are, up to float noise).
        for i in 1..deltas.len() {
            deltas[i] = deltas[i].min(deltas[i - 1]);
        }
        let n = deltas.len();
        let diffs: Vec<f64> = deltas.windows(2).map(|w| w[1] - w[0]).collect();
        let em1 = d.exp_m1();
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - deltas[0] + diffs[0] / em1;
        for i in 1..n - 1 {
            probs[i] = (diffs[i] - diffs[i - 1] * d.exp()) / em1;
        }
        probs[n - 1] = diffs[n - 2] / (-d).exp_m1();
        for p in probs.iter_mut() {
            *p = p.max(0.0);
        }
        Ok(Self {
            discretization: d,
            lower_loss: lo,
            probs,
            infinity_mass: deltas[n - 1],
            log_mgfs: OnceLock::new(),
        })
    }

    /// Composition with another PMF of the same discretisation (linear convolution by FFT), tails truncated.
    pub fn compose(&self, other: &Pmf) -> Pmf {
        let probs = fft_convolve(&self.probs, &other.probs);
        let infinity_mass =
            self.infinity_mass + other.infinity_mass - self.infinity_mass * other.infinity_mass;
        let (offset, probs, right) = truncate_tails(probs, TAIL_MASS_TRUNCATION);
        Pmf {
            discretization: self.discretization,
            lower_loss: self.lower_loss + other.lower_loss + offset as i64,
            probs,
            infinity_mass: infinity_mass + right,
            log_mgfs: OnceLock::new(),
        }
    }

    /// `n`-fold self-composition: one FFT, raised to the n-th power, within Chernoff bounds on the result's range.
    pub fn self_compose(&self, n: u64) -> Pmf {
        if n == 1 {
            return self.clone();
        }
        let log_mgfs = self.log_mgfs.get_or_init(|| log_mgfs(&self.probs));
        let (lower, upper) =
            self_convolve_bounds(self.probs.len(), log_mgfs, n, TAIL_MASS_TRUNCATION);
        let output_len = (upper - lower + 1) as usize;
        let len = next_fast_len(output_len.max(self.probs.len()));
        let mut buf: Vec<Complex<f64>> = self.probs.iter().map(|&p| Complex::new(p, 0.0)).collect();
        buf.resize(len, Complex::new(0.0, 0.0));
        let mut planner = FftPlanner::new();
        planner.plan_fft_forward(len).process(&mut buf);
        for c in buf.iter_mut() {
            *c = pow(*c, n);
        }
        planner.plan_fft_inverse(len).process(&mut buf);
        let scale = 1.0 / len as f64;
        let probs: Vec<f64> = (0..output_len)
            .map(|i| buf[((i as i64 + lower).rem_euclid(len as i64)) as usize].re * scale)
            .collect();
        let inf = TAIL_MASS_TRUNCATION - (n as f64 * (-self.infinity_mass).ln_1p()).exp_m1();
        Pmf {
            discretization: self.discretization,
            lower_loss: self.lower_loss * n as i64 + lower,
            probs,
            infinity_mass: inf,
            log_mgfs: OnceLock::new(),
        }
    }

    fn loss(&self, i: usize) -> f64 {
        (self.lower_loss + i as i64) as f64 * self.discretization
    }

    /// δ(ε): the hockey-stick divergence this PMF bounds.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let mut delta = self.infinity_mass;
        for (i, &p) in self.probs.iter().enumerate() {
            let l = self.loss(i);
            if l > epsilon {
                delta += -(epsilon - l).exp_m1() * p;
            }
        }
        delta
    }

    /// The smallest ε with δ(ε) ≤ `delta` (dp_accounting's `_get_epsilon_for_delta`).
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        let (mut upper, mut lower) = (self.infinity_mass, 0.0f64);
        for i in (0..self.probs.len()).rev() {
            let loss = self.loss(i);
            let p = self.probs[i];
            if upper > delta && lower > 0.0 && ((upper - delta) / lower).ln() >= loss {
                break;
            }
            upper += p;
            lower += (-loss).exp() * p;
            if upper >= delta && lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if upper <= lower + delta {
            0.0
        } else {
            ((upper - delta) / lower).ln()
        }
    }
}

/// The orders t and log Σ_i p_i e^{i·t} (stably) that bound an n-fold self-convolution of `probs`.
fn log_mgfs(probs: &[f64]) -> Vec<(f64, f64)> {
    let len = probs.len();
    (-20..0)
        .chain(1..21)
        .map(|o| f64::from(o) / len as f64)
        .map(|order| {
            let m = probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.0)
                .map(|(i, _)| i as f64 * order)
                .fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = probs
                .iter()
                .enumerate()
                .map(|(i, &p)| p * (i as f64 * order - m).exp())
                .sum();
            (order, m + s.ln())
        })
        .collect()
}

/// The index range outside which an `n`-fold self-convolution of a PMF of `len` values (with
/// [`log_mgfs`] `log_mgfs`) holds at most `truncation` of its mass (Chernoff bounds).
fn self_convolve_bounds(
    len: usize,
    log_mgfs: &[(f64, f64)],
    n: u64,
    truncation: f64,
) -> (i64, i64) {
    let mut upper = (len as i64 - 1) * n as i64;
    let mut lower = 0i64;
    for &(order, log_mgf) in log_mgfs {
        let bound = (n as f64 * log_mgf + (2.0 / truncation).ln()) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            upper = upper.min(bound.ceil() as i64);
        } else {
            lower = lower.max(bound.floor() as i64);
        }
    }
    (lower, upper)
}

fn truncate_tails(mut probs: Vec<f64>, truncation: f64) -> (usize, Vec<f64>, f64) {
    let find = |it: &mut dyn Iterator<Item = f64>| {
        let mut s = 0.0;
        let mut count = 0;
        for v in it {
            s += v;
            if s > truncation / 2.0 {
                return count;
            }
            count += 1;
        }
        count
    };
    let left = find(&mut probs.iter().copied());
    let right = probs.len() - find(&mut probs.iter().rev().copied());
    let right = right.max(left + 1).min(probs.len());
    let left_mass: f64 = probs[..left].iter().sum();
    let right_mass: f64 = probs[right..].iter().sum();
    probs.truncate(right);
    probs.drain(..left);
    probs[0] += left_mass;
    (left, probs, right_mass)
}

/// `c` to the `n`-th power by squaring (`Complex::powu` stops at 2³² − 1; below it, the same result).
fn pow(c: Complex<f64>, n: u64) -> Complex<f64> {
    match u32::try_from(n) {
        Ok(n) => c.powu(n),
        Err(_) => {
            let half = pow(c, n / 2);
            let sq = half * half;
            if n % 2 == 1 {
                sq * c
            } else {
                sq
            }
        }
    }
}

/// The smallest 2·3·5·7-smooth length ≥ n (fast for rustfft).
fn next_fast_len(n: usize) -> usize {
    let mut m = n.max(1);
    loop {
        let mut r = m;
        for p in [2, 3, 5, 7] {
            while r.is_multiple_of(p) {
                r /= p;
            }
        }
        if r == 1 {
            return m;
        }
        m += 1;
    }
}

fn fft_convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, &x) in a.iter().enumerate() {
            for (j, &y) in b.iter().enumerate() {
                out[i + j] += x * y;
            }
        }
        return out;
    }
    let len = next_fast_len(out_len);
    let mut planner = FftPlanner::new();
    let fwd = planner.plan_fft_forward(len);
    let mut fa: Vec<Complex<f64>> = a.iter().map(|&x| Complex::new(x, 0.0)).collect();
    fa.resize(len, Complex::new(0.0, 0.0));
    let mut fb: Vec<Complex<f64>> = b.iter().map(|&x| Complex::new(x, 0.0)).collect();
    fb.resize(len, Complex::new(0.0, 0.0));
    fwd.process(&mut fa);
    fwd.process(&mut fb);
    for (x, y) in fa.iter_mut().zip(&fb) {
        *x *= y;
    }
    planner.plan_fft_inverse(len).process(&mut fa);
    fa[..out_len].iter().map(|c| c.re / len as f64).collect()
}

/// The most buckets a stored PMF may hold when read back (512 MiB of f64): a composed PLD is far smaller.
const MAX_STORED_BUCKETS: u64 = 1 << 26;
/// The first bytes of a stored PLD (format 1).
const STORED_MAGIC: &[u8; 5] = b"SPLD1";

/// Reads `N` bytes from the front of `bytes`.
fn take<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], PrivacyError> {
    let (head, rest) = bytes.split_first_chunk::<N>().ok_or_else(|| {
        PrivacyError::Corrupt(format!(
            "a stored PLD ends early ({} bytes left)",
            bytes.len()
        ))
    })?;
    *bytes = rest;
    Ok(*head)
}

impl Pmf {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.discretization.to_le_bytes());
        out.extend_from_slice(&self.lower_loss.to_le_bytes());
        out.extend_from_slice(&self.infinity_mass.to_le_bytes());
        out.extend_from_slice(&(self.probs.len() as u64).to_le_bytes());
        for p in &self.probs {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }

    /// A PMF written by [`Pmf::write`], checked to be a probability distribution (up to the round-off
    /// of its FFTs) before anything is computed on it.
    fn read(bytes: &mut &[u8]) -> Result<Self, PrivacyError> {
        let bad = |what: String| PrivacyError::Corrupt(format!("a stored PLD: {what}"));
        let discretization = f64::from_le_bytes(take(bytes)?);
        let lower_loss = i64::from_le_bytes(take(bytes)?);
        let infinity_mass = f64::from_le_bytes(take(bytes)?);
        let n = u64::from_le_bytes(take(bytes)?);
        if !(discretization > 0.0 && discretization.is_finite()) {
            return Err(bad(format!("discretisation {discretization}")));
        }
        if !(0.0..=1.0).contains(&infinity_mass) {
            return Err(bad(format!("mass at infinity {infinity_mass}")));
        }
        if n == 0 || n > MAX_STORED_BUCKETS || (bytes.len() as u64) < n * 8 {
            return Err(bad(format!(
                "{n} buckets in {} bytes (at most {MAX_STORED_BUCKETS})",
                bytes.len()
            )));
        }
        let mut probs = Vec::with_capacity(n as usize);
        for i in 0..n {
            let p = f64::from_le_bytes(take(bytes)?);
            // FFT round-off leaves values a hair below zero; nothing else may be.
            if !(-1e-9..=1.0 + 1e-9).contains(&p) {
                return Err(bad(format!("probability {p} at bucket {i}")));
            }
            probs.push(p);
        }
        // A composition's mass drifts above one (the connect-the-dots PMF's clamped round-off, carried
        // through every convolution: 1 + 6e-6 after 100 rounds at σ ≈ 0.37), which only errs towards a
        // larger ε; mass missing would err the other way, so it is bounded tightly.
        let total = probs.iter().sum::<f64>() + infinity_mass;
        if !(1.0 - 1e-6..=1.01).contains(&total) {
            return Err(bad(format!("total mass {total}")));
        }
        Ok(Self {
            discretization,
            lower_loss,
            probs,
            infinity_mass,
            log_mgfs: OnceLock::new(),
        })
    }
}

impl Pld {
    /// The PLD of no mechanism at all (ε = 0).
    pub fn identity(discretization: f64) -> Self {
        Self {
            remove: Pmf::identity(discretization),
            add: None,
        }
    }

    /// One step of the Gaussian mechanism with noise multiplier `sigma` (sensitivity 1), Poisson-subsampled at
    /// rate `q`, under add-or-remove-one adjacency.
    pub fn subsampled_gaussian(
        sigma: f64,
        q: f64,
        discretization: f64,
    ) -> Result<Self, PrivacyError> {
        crate::rdp::check_q_sigma(q, sigma)?;
        if !(sigma > 0.0 && q > 0.0) {
            return Err(PrivacyError::InvalidParameter(
                "a PLD needs a positive noise multiplier and sampling rate".into(),
            ));
        }
        if !(discretization > 0.0 && discretization.is_finite()) {
            return Err(PrivacyError::InvalidParameter(format!(
                "bad discretisation {discretization}"
            )));
        }
        let make = |adjacency| {
            Pmf::connect_dots(
                &GaussianLoss {
                    sigma,
                    sensitivity: 1.0,
                    q,
                    adjacency,
                },
                discretization,
            )
        };
        let remove = make(Adjacency::Remove)?;
        let add = if q == 1.0 {
            None
        } else {
            Some(make(Adjacency::Add)?)
        };
        Ok(Self { remove, add })
    }

    /// Sequential composition with another PLD.
    pub fn compose(&self, other: &Pld) -> Pld {
        let remove = self.remove.compose(&other.remove);
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => Some(
                a.as_ref()
                    .unwrap_or(&self.remove)
                    .compose(b.as_ref().unwrap_or(&other.remove)),
            ),
        };
        Pld { remove, add }
    }

    /// `n`-fold composition with itself.
    pub fn self_compose(&self, n: u64) -> Pld {
        Pld {
            remove: self.remove.self_compose(n),
            add: self.add.as_ref().map(|a| a.self_compose(n)),
        }
    }

    /// The width of its privacy-loss buckets.
    pub(crate) fn discretization(&self) -> f64 {
        self.remove.discretization
    }

    /// The PLD as bytes (a checkpoint of a long composition), read back exactly by [`Pld::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.remove.probs.len() + self.add.as_ref().map_or(0, |a| a.probs.len());
        let mut out = Vec::with_capacity(STORED_MAGIC.len() + 1 + 64 + 8 * len);
        out.extend_from_slice(STORED_MAGIC);
        out.push(u8::from(self.add.is_some()));
        self.remove.write(&mut out);
        if let Some(a) = &self.add {
            a.write(&mut out);
        }
        out
    }

    /// A PLD written by [`Pld::to_bytes`]: the same values to the bit, or [`PrivacyError::Corrupt`] for
    /// bytes that are not one (bounded sizes, finite probabilities summing to one, one discretisation).
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, PrivacyError> {
        if take::<5>(&mut bytes)? != *STORED_MAGIC {
            return Err(PrivacyError::Corrupt("not a stored PLD (format 1)".into()));
        }
        let has_add = match take::<1>(&mut bytes)?[0] {
            0 => false,
            1 => true,
            b => return Err(PrivacyError::Corrupt(format!("a stored PLD: flag {b}"))),
        };
        let remove = Pmf::read(&mut bytes)?;
        let add = if has_add {
            let a = Pmf::read(&mut bytes)?;
            if a.discretization != remove.discretization {
                return Err(PrivacyError::Corrupt(
                    "a stored PLD: its adjacencies differ in discretisation".into(),
                ));
            }
            Some(a)
        } else {
            None
        };
        if !bytes.is_empty() {
            return Err(PrivacyError::Corrupt(format!(
                "a stored PLD: {} bytes after its end",
                bytes.len()
            )));
        }
        Ok(Self { remove, add })
    }

    /// ε for a target δ: the worse of the two adjacencies.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        let r = self.remove.epsilon_for_delta(delta);
        self.add
            .as_ref()
            .map_or(r, |a| r.max(a.epsilon_for_delta(delta)))
    }

    /// δ for a target ε: the worse of the two adjacencies.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let r = self.remove.delta_for_epsilon(epsilon);
        self.add
            .as_ref()
            .map_or(r, |a| r.max(a.delta_for_epsilon(epsilon)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_pld_reads_back_to_the_bit_and_bad_bytes_are_refused() {
        let one = Pld::subsampled_gaussian(1.0, 0.01, DEFAULT_DISCRETIZATION).unwrap();
        let pld = one.self_compose(7).compose(&one);
        let bytes = pld.to_bytes();
        let back = Pld::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.epsilon_for_delta(1e-5), pld.epsilon_for_delta(1e-5));
        // q = 1: one adjacency.
        let full = Pld::subsampled_gaussian(2.0, 1.0, DEFAULT_DISCRETIZATION).unwrap();
        assert_eq!(
            Pld::from_bytes(&full.to_bytes()).unwrap().to_bytes(),
            full.to_bytes()
        );
        let refused = |b: &[u8]| matches!(Pld::from_bytes(b), Err(PrivacyError::Corrupt(_)));
        assert!(refused(&bytes[..bytes.len() - 1]), "truncated");
        assert!(
            refused(&[bytes.as_slice(), &[0]].concat()),
            "trailing bytes"
        );
        assert!(refused(b"SPLD2"), "another format");
        assert!(refused(&[]), "empty");
        // Header: magic (5), flag (1), discretisation (8), lower loss (8), mass at ∞ (8), count (8).
        let mut huge = bytes.clone();
        huge[30..38].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            refused(&huge),
            "a count past the bound is refused before allocating"
        );
        let first = 38;
        for bad in [f64::NAN, -0.5, 2.0] {
            let mut b = bytes.clone();
            b[first..first + 8].copy_from_slice(&bad.to_le_bytes());
            assert!(refused(&b), "probability {bad}");
        }
        // A PMF missing mass (a bucket emptied).
        let mut b = bytes.clone();
        let n = u64::from_le_bytes(bytes[30..38].try_into().unwrap()) as usize;
        let (at, _) = (0..n)
            .map(|i| {
                let o = first + 8 * i;
                (o, f64::from_le_bytes(b[o..o + 8].try_into().unwrap()))
            })
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap();
        b[at..at + 8].copy_from_slice(&0f64.to_le_bytes());
        assert!(refused(&b), "the largest bucket emptied");
    }

    #[test]
    fn pmfs_are_probability_distributions() {
        let pld = Pld::subsampled_gaussian(1.0, 0.01, DEFAULT_DISCRETIZATION).unwrap();
        for pmf in [&pld.remove, pld.add.as_ref().unwrap()] {
            let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity_mass;
            assert!((total - 1.0).abs() < 1e-7, "{total}");
        }
        let composed = pld.self_compose(100);
        let total: f64 = composed.remove.probs.iter().sum::<f64>() + composed.remove.infinity_mass;
        assert!((total - 1.0).abs() < 1e-6, "{total}");
    }

    #[test]
    fn plain_gaussian_matches_the_analytic_delta() {
        // Balle & Wang (2018): δ(ε) = Φ(1/2σ - εσ) - e^ε Φ(-1/2σ - εσ) for the Gaussian with sensitivity 1.
        let sigma = 2.0;
        let pld = Pld::subsampled_gaussian(sigma, 1.0, DEFAULT_DISCRETIZATION).unwrap();
        for eps in [0.1, 0.5, 1.0] {
            let exact = special::ndtr(0.5 / sigma - eps * sigma)
                - f64::exp(eps) * special::ndtr(-0.5 / sigma - eps * sigma);
            let got = pld.delta_for_epsilon(eps);
            assert!(
                got >= exact * (1.0 - 1e-9) && got < exact * 1.01,
                "{eps}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn a_multiplier_too_small_for_the_pld_is_an_error_not_gigabytes() {
        let e = Pld::subsampled_gaussian(0.01, 0.002, DEFAULT_DISCRETIZATION).unwrap_err();
        assert!(e.to_string().contains("RDP"), "{e}");
        assert!(Pld::subsampled_gaussian(0.3665, 0.002, DEFAULT_DISCRETIZATION).is_ok());
    }

    #[test]
    fn powers_past_u32_are_exact_where_they_can_be() {
        let i = Complex::new(0.0, 1.0);
        let big = u64::from(u32::MAX) + 6;
        assert_eq!(pow(i, big), i.powu(((big % 4) as u32) + 4));
        assert_eq!(pow(Complex::new(-1.0, 0.0), big), Complex::new(-1.0, 0.0));
        assert_eq!(pow(Complex::new(0.5, 0.0), big), Complex::new(0.0, 0.0));
        assert_eq!(pow(i, 7), i.powu(7));
    }

    #[test]
    fn composition_by_fft_equals_direct_convolution() {
        let a = Pmf {
            discretization: 0.1,
            lower_loss: -2,
            probs: vec![0.1, 0.2, 0.3, 0.4],
            infinity_mass: 0.0,
            log_mgfs: OnceLock::new(),
        };
        let twice = a.self_compose(2);
        let direct = a.compose(&a);
        for eps in [0.0, 0.2, 0.5] {
            assert!((twice.delta_for_epsilon(eps) - direct.delta_for_epsilon(eps)).abs() < 1e-12);
        }
        assert_eq!(next_fast_len(11), 12);
        assert_eq!(next_fast_len(121), 125);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Pld::subsampled_gaussian(0.0, 0.1, 1e-4).is_err());
        assert!(Pld::subsampled_gaussian(1.0, 1.5, 1e-4).is_err());
        assert!(Pld::subsampled_gaussian(1.0, 0.1, 0.0).is_err());
    }
}
