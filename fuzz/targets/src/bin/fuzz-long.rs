//! `fuzz-long`: runs the fuzz targets for longer than the CI tests do and
//! prints one JSON summary line per target.
//!
//! ```text
//! cargo run --release -p somna-fuzz --bin fuzz-long -- [--seconds N] [--seed S]
//!     [--crash-dir DIR] [--max-crashes N] [TARGET...]
//! ```
//!
//! Each target runs for `--seconds` (default 60). A crash does not end the
//! target's run: its input is saved (by default straight into
//! `fuzz/targets/regressions/<target>/`, where the tests replay it) and
//! fuzzing goes on with the next PRNG seed, until the time is up or
//! `--max-crashes` crashes were found. Exits 1 when anything crashed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use somna_fuzz::{Budget, RunOptions, Target};

struct Args {
    seconds: f64,
    seed: u64,
    crash_dir: PathBuf,
    max_crashes: usize,
    targets: Vec<&'static Target>,
}

fn usage() -> String {
    let names: Vec<&str> = somna_fuzz::ALL.iter().map(|t| t.name).collect();
    format!(
        "usage: fuzz-long [--seconds N] [--seed S] [--crash-dir DIR] [--max-crashes N] [TARGET...]\n\
         targets: {}",
        names.join(" ")
    )
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 60.0,
        seed: RunOptions::default().rng_seed,
        crash_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions"),
        max_crashes: 10,
        targets: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?;
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
            }
            "--crash-dir" => args.crash_dir = PathBuf::from(value("--crash-dir")?),
            "--max-crashes" => {
                args.max_crashes = value("--max-crashes")?
                    .parse()
                    .map_err(|e| format!("--max-crashes: {e}"))?;
            }
            "-h" | "--help" => return Err(usage()),
            name if name.starts_with('-') => return Err(format!("unknown option {name}")),
            name => args
                .targets
                .push(somna_fuzz::by_name(name).ok_or_else(|| format!("no target {name}"))?),
        }
    }
    if !args.seconds.is_finite() || args.seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    if args.targets.is_empty() {
        args.targets = somna_fuzz::ALL.iter().collect();
    }
    Ok(args)
}

/// One target's JSON summary line (fields in this order).
#[derive(serde::Serialize)]
struct Line<'a> {
    target: &'a str,
    iterations: u64,
    seconds: f64,
    crashes: usize,
    execs_per_sec: f64,
    /// Inputs the target accepted all the way.
    accepted: u64,
    /// Distinct outcomes seen (the most in one round).
    outcomes: usize,
    /// Where crashing inputs were saved.
    crash_files: Vec<String>,
    crash_messages: BTreeSet<&'a str>,
}

struct Summary {
    iterations: u64,
    accepted: u64,
    outcomes: usize,
    elapsed: Duration,
    crashes: Vec<somna_fuzz::Crash>,
}

fn fuzz_target(t: &'static Target, args: &Args) -> Summary {
    let started = Instant::now();
    let total = Duration::from_secs_f64(args.seconds);
    let mut s = Summary {
        iterations: 0,
        accepted: 0,
        outcomes: 0,
        elapsed: Duration::ZERO,
        crashes: Vec::new(),
    };
    let mut seeds = (t.seeds)();
    if let Ok(entries) = std::fs::read_dir(args.crash_dir.join(t.name)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file()
                && !name.starts_with('.')
                && !name.starts_with("README")
                && let Ok(d) = std::fs::read(e.path())
            {
                seeds.push(d);
            }
        }
    }
    let mut messages = BTreeSet::new();
    let mut round = 0u64;
    while started.elapsed() < total && s.crashes.len() < args.max_crashes {
        let options = RunOptions {
            rng_seed: args.seed.wrapping_add(round),
            crash_dir: Some(args.crash_dir.clone()),
            ..RunOptions::default()
        };
        round += 1;
        let budget = Budget {
            iterations: u64::MAX,
            time: total.saturating_sub(started.elapsed()),
        };
        match somna_fuzz::run(t, &seeds, budget, &options) {
            Ok(r) => {
                s.iterations += r.iterations;
                s.accepted += r.accepted;
                s.outcomes = s.outcomes.max(r.outcomes);
            }
            Err(crash) => {
                s.iterations += crash.iteration;
                eprintln!("{crash}");
                if messages.insert(crash.message.clone()) {
                    eprintln!("{}", crash.backtrace);
                }
                // A crashing input among the seeds would end every later
                // round at once.
                seeds.retain(|d| *d != crash.input);
                s.crashes.push(crash);
            }
        }
    }
    s.elapsed = started.elapsed();
    s
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuzz-long: {e}");
            return ExitCode::from(2);
        }
    };
    let mut crashed = false;
    for &t in &args.targets {
        // On a thread of its own, so per-thread state (the image targets'
        // store and temporary directory) is dropped when it ends.
        let s = std::thread::scope(|scope| {
            scope
                .spawn(|| fuzz_target(t, &args))
                .join()
                .expect("the fuzzing thread panicked outside a target")
        });
        crashed |= !s.crashes.is_empty();
        let secs = s.elapsed.as_secs_f64();
        let files: Vec<String> = s
            .crashes
            .iter()
            .filter_map(|c| c.path.as_ref().map(|p| p.display().to_string()))
            .collect();
        let messages: BTreeSet<&str> = s.crashes.iter().map(|c| c.message.as_str()).collect();
        let line = Line {
            target: t.name,
            iterations: s.iterations,
            seconds: (secs * 10.0).round() / 10.0,
            crashes: s.crashes.len(),
            execs_per_sec: (s.iterations as f64 / secs.max(1e-9)).round(),
            accepted: s.accepted,
            outcomes: s.outcomes,
            crash_files: files,
            crash_messages: messages,
        };
        let line = serde_json::to_string(&line).expect("JSON");
        println!("{line}");
    }
    if crashed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
