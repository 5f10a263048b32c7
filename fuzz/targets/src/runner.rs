//! The bounded mutation fuzzer: runs a target on mutated inputs until an
//! iteration or time budget is spent, catching panics.
//!
//! Deterministic: with the same seeds, rng seed and iteration budget it runs
//! the same inputs in the same order (a time budget may only cut the run
//! short). There is no coverage instrumentation on stable Rust, so the
//! corpus grows by *outcome* instead: each target reports a signature of
//! what an input did (accepted, or which error, with numbers and paths
//! stripped), and an input with a signature not seen before is kept for
//! further mutation. That finds the deeper parser states (a valid header
//! followed by a bad field, ...) far better than mutating the seeds alone.

use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::mutate::{Mutator, Rng};
use crate::targets::Target;

/// How much fuzzing one run may do; it stops at whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub iterations: u64,
    pub time: Duration,
}

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Seed of the PRNG that picks and mutates inputs.
    pub rng_seed: u64,
    /// A crashing input is written to `<crash_dir>/<target>/crash-<hash>`.
    /// `None`: not written (the error still carries it).
    pub crash_dir: Option<PathBuf>,
    /// Corpus entries kept at most (seeds included).
    pub max_corpus: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            rng_seed: 0x5eed_50a1_f022_0010,
            crash_dir: None,
            max_corpus: 512,
        }
    }
}

/// What a run that found nothing did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub target: &'static str,
    /// Inputs executed (seeds included).
    pub iterations: u64,
    pub elapsed: Duration,
    /// Corpus size at the end (seeds plus inputs with new outcomes).
    pub corpus: usize,
    /// Distinct outcome signatures seen.
    pub outcomes: usize,
    /// Inputs the target accepted (parsed, unpacked, validated...).
    pub accepted: u64,
}

impl Report {
    pub fn execs_per_sec(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A panic found by the fuzzer.
#[derive(Clone, Debug)]
pub struct Crash {
    pub target: &'static str,
    /// 1-based number of the execution that panicked.
    pub iteration: u64,
    pub input: Vec<u8>,
    /// The panic message, with its location when known.
    pub message: String,
    /// Captured where the panic happened (when it happened on the target's
    /// thread; empty otherwise).
    pub backtrace: String,
    /// Where the input was written, if it was.
    pub path: Option<PathBuf>,
    /// Set when writing the input failed.
    pub write_error: Option<String>,
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: panic at iteration {} on a {}-byte input: {}",
            self.target,
            self.iteration,
            self.input.len(),
            self.message
        )?;
        match (&self.path, &self.write_error) {
            (Some(p), _) => write!(f, " (input saved as {})", p.display()),
            (None, Some(e)) => write!(f, " (the input could not be saved: {e})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for Crash {}

/// The file name a crashing input is saved under: stable for the same
/// bytes, so a crash found twice is one file.
pub fn crash_file_name(input: &[u8]) -> String {
    format!("crash-{:016x}", fnv1a(input))
}

/// FNV-1a, 64 bits.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fuzzes `target`, starting from `seeds` (the target's own seeds when
/// empty), until `budget` is spent. Every seed runs once first, then
/// mutations of corpus entries. The first panic stops the run: the input is
/// written under `options.crash_dir` and returned in the error.
// One crash ends a run, so boxing the error would buy nothing.
#[allow(clippy::result_large_err)]
pub fn run(
    target: &Target,
    seeds: &[Vec<u8>],
    budget: Budget,
    options: &RunOptions,
) -> Result<Report, Crash> {
    let started = Instant::now();
    let mut corpus: Vec<Vec<u8>> = if seeds.is_empty() {
        (target.seeds)()
    } else {
        seeds.to_vec()
    };
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    for s in &mut corpus {
        s.truncate(target.max_len);
    }
    let mut rng = Rng::new(options.rng_seed ^ fnv1a(target.name.as_bytes()));
    let mutator = Mutator {
        dict: target.dict,
        max_len: target.max_len,
    };
    let mut seen = HashSet::new();
    let mut report = Report {
        target: target.name,
        iterations: 0,
        elapsed: Duration::ZERO,
        corpus: 0,
        outcomes: 0,
        accepted: 0,
    };
    let n_seeds = corpus.len();
    let mut pending_seeds = n_seeds;
    let mut input = Vec::new();
    while report.iterations < budget.iterations && started.elapsed() < budget.time {
        let from_seed = pending_seeds > 0;
        if from_seed {
            input.clone_from(&corpus[corpus.len() - pending_seeds]);
            pending_seeds -= 1;
        } else {
            // A seed a third of the time, so that inputs found later (most
            // of them broken early on) do not crowd out the valid ones.
            let pick = if rng.one_in(3) {
                rng.below(n_seeds)
            } else {
                rng.below(corpus.len())
            };
            input.clone_from(&corpus[pick]);
            let other = &corpus[rng.below(corpus.len())];
            mutator.mutate(&mut rng, &mut input, other);
        }
        report.iterations += 1;
        match execute(target, &input) {
            Ok(outcome) => {
                report.accepted += u64::from(outcome.accepted);
                if seen.insert(outcome.signature) && !from_seed {
                    if corpus.len() < options.max_corpus {
                        corpus.push(input.clone());
                    } else {
                        // Keep the seeds; replace something found later.
                        let n = n_seeds.min(corpus.len() - 1);
                        let i = n + rng.below(corpus.len() - n);
                        corpus[i] = input.clone();
                    }
                }
            }
            Err(caught) => {
                let mut crash = Crash {
                    target: target.name,
                    iteration: report.iterations,
                    input: input.clone(),
                    message: caught.message,
                    backtrace: caught.backtrace,
                    path: None,
                    write_error: None,
                };
                if let Some(dir) = &options.crash_dir {
                    let dir = dir.join(target.name);
                    let path = dir.join(crash_file_name(&input));
                    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &input))
                    {
                        Ok(()) => crash.path = Some(path),
                        Err(e) => crash.write_error = Some(format!("{}: {e}", path.display())),
                    }
                }
                return Err(crash);
            }
        }
    }
    report.elapsed = started.elapsed();
    report.corpus = corpus.len();
    report.outcomes = seen.len();
    Ok(report)
}

/// What a target reports about one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The input was accepted all the way (not rejected as invalid).
    pub accepted: bool,
    /// Stands for what the input did; new signatures grow the corpus.
    pub signature: u64,
}

impl Outcome {
    pub fn accepted(what: &str) -> Outcome {
        Outcome {
            accepted: true,
            signature: signature(&format!("ok {what}")),
        }
    }

    /// A rejection, by its error message (numbers and `strip`, e.g. a temp
    /// path, removed so that the signature names the kind of error).
    pub fn rejected(message: &str, strip: &str) -> Outcome {
        let message = if strip.is_empty() {
            message.to_string()
        } else {
            message.replace(strip, "")
        };
        Outcome {
            accepted: false,
            signature: signature(&format!("err {message}")),
        }
    }
}

/// A signature of a description, so that it names a kind of outcome rather
/// than one input: quoted text (names and values from the input, as `{:?}`
/// and serde quote them), words with hex strings (digests), non-ASCII or
/// control characters (raw input bytes in messages) and digits are left
/// out.
fn signature(s: &str) -> u64 {
    let mut unquoted = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            // Up to the closing quote (past escaped ones), or the end.
            while let Some(q) = chars.next() {
                match q {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            unquoted.push_str("\"\"");
        } else {
            unquoted.push(c);
        }
    }
    let mut kept = Vec::new();
    for word in unquoted.split_whitespace() {
        let hex_run = word
            .as_bytes()
            .split(|b| !b.is_ascii_hexdigit())
            .any(|run| run.len() >= 6);
        if hex_run || word.len() > 40 || word.chars().any(|c| !c.is_ascii() || c.is_ascii_control())
        {
            kept.push(b'~');
        } else {
            kept.extend(word.bytes().filter(|b| !b.is_ascii_digit()));
        }
        kept.push(b' ');
    }
    fnv1a(&kept)
}

/// A caught panic.
pub struct Caught {
    pub message: String,
    pub backtrace: String,
}

thread_local! {
    /// Set while this thread runs a target under [`execute`].
    static IN_TARGET: Cell<bool> = const { Cell::new(false) };
    /// The first panic on this thread while `IN_TARGET`, with its location
    /// and backtrace.
    static PANICKED: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records panics on threads running a
/// target, including panics inside tasks of a current-thread runtime that
/// tokio catches itself, and leaves every other panic to the previous hook.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_TARGET.with(Cell::get) {
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic payload)".into());
                let message = match info.location() {
                    Some(l) => format!("{payload} (at {}:{}:{})", l.file(), l.line(), l.column()),
                    None => payload,
                };
                let bt = Backtrace::force_capture().to_string();
                PANICKED.with(|p| {
                    p.borrow_mut().get_or_insert((message, bt));
                });
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs the target once on `input`. `Err` when it panicked: unwinding out
/// of it, or in a task on its thread that its runtime caught.
pub fn execute(target: &Target, input: &[u8]) -> Result<Outcome, Caught> {
    install_hook();
    PANICKED.with(|p| p.borrow_mut().take());
    IN_TARGET.with(|f| f.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.execute)(input)));
    IN_TARGET.with(|f| f.set(false));
    let recorded = PANICKED.with(|p| p.borrow_mut().take());
    match (result, recorded) {
        (Ok(outcome), None) => Ok(outcome),
        (Ok(_), Some((message, backtrace))) => Err(Caught {
            message: format!(
                "panic inside a task of the target (caught by its runtime): {message}"
            ),
            backtrace,
        }),
        (Err(payload), recorded) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".into());
            // The hook saw it when it happened on this thread (it then has
            // the location); a panic resumed from another thread (a
            // blocking pool) only brings its payload.
            let (message, backtrace) = recorded.unwrap_or((text, String::new()));
            Err(Caught { message, backtrace })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_name_kinds_of_outcome() {
        let a = Outcome::rejected("entry \"etc/x\": bad uid 12 in sha256:0123abcdef99", "");
        let b = Outcome::rejected("entry \"a\\\"b\": bad uid 7 in sha256:ffee0011aa", "");
        assert_eq!(a, b);
        assert_ne!(a, Outcome::rejected("entry \"a\": bad gid 7", ""));
        assert_ne!(a.signature, Outcome::accepted("entry").signature);
        assert!(!a.accepted && Outcome::accepted("").accepted);
        // A temporary path is stripped as asked.
        assert_eq!(
            Outcome::rejected("cannot create /tmp/x.1/root/a", "/tmp/x.1/root"),
            Outcome::rejected("cannot create /tmp/y.2/root/a", "/tmp/y.2/root")
        );
        // An unterminated quote does not run past the end.
        let _ = Outcome::rejected("\"abc\\", "");
    }
}
