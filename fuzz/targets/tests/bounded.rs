//! Bounded fuzzing in CI: every target runs for a few seconds (or an
//! iteration budget, whichever ends first) and must not panic, and every
//! saved regression input replays without a panic.
//!
//! `SOMNA_FUZZ_SECONDS` sets the time per target (default 5),
//! `SOMNA_FUZZ_SEED` the PRNG seed (default fixed, so CI runs the same
//! inputs each time up to the time limit). Crashes are written under
//! `target/fuzz-crashes/<target>/`; move one to `regressions/<target>/` to
//! keep it as a regression test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use somna_fuzz::{Budget, RunOptions, Target};

/// Iterations per target at most (the time budget usually ends it first).
const MAX_ITERATIONS: u64 = 1_000_000;
/// Executions a run must reach to count as having fuzzed at all. Low on
/// purpose: CI machines are slow and the tests run in parallel; even the
/// slowest target does thousands per second on a laptop.
const MIN_ITERATIONS: u64 = 100;

fn seconds() -> f64 {
    std::env::var("SOMNA_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(5.0)
}

fn rng_seed() -> u64 {
    std::env::var("SOMNA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RunOptions::default().rng_seed)
}

fn regressions_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target)
}

fn crash_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR lives in the target directory.
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes")
}

/// The saved inputs of a target: every file in its regressions directory
/// except dot files and READMEs.
fn regression_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = regressions_dir(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("cannot list regressions").path())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                p.is_file() && !name.starts_with('.') && !name.starts_with("README")
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("cannot read a regression input");
            (p, data)
        })
        .collect()
}

fn target(name: &str) -> &'static Target {
    somna_fuzz::by_name(name).unwrap_or_else(|| panic!("no target {name}"))
}

fn fuzz(name: &str) {
    let t = target(name);
    // The seeds, and the regression inputs as seeds too.
    let mut seeds = (t.seeds)();
    seeds.extend(regression_inputs(name).into_iter().map(|(_, d)| d));
    let budget = Budget {
        iterations: MAX_ITERATIONS,
        time: Duration::from_secs_f64(seconds()),
    };
    let options = RunOptions {
        rng_seed: rng_seed(),
        crash_dir: Some(crash_dir()),
        ..RunOptions::default()
    };
    match somna_fuzz::run(t, &seeds, budget, &options) {
        Ok(report) => {
            eprintln!(
                "{name}: {} iterations in {:.1?} ({:.0}/s), {} accepted, {} outcomes, corpus {}",
                report.iterations,
                report.elapsed,
                report.execs_per_sec(),
                report.accepted,
                report.outcomes,
                report.corpus
            );
            assert!(
                report.iterations >= MIN_ITERATIONS,
                "{name}: only {} iterations ran",
                report.iterations
            );
            assert!(
                report.iterations > seeds.len() as u64,
                "{name}: no mutated input ran"
            );
            assert!(report.accepted > 0, "{name}: no input was accepted");
            assert!(
                report.outcomes > 1,
                "{name}: every input did the same thing; the target ignores its input"
            );
        }
        Err(crash) => panic!("{crash}\n{}", crash.backtrace),
    }
}

/// Every seed of a target is accepted: the targets reach the code past
/// parsing, so mutations start from inputs that matter.
fn seeds_accepted(name: &str) {
    let t = target(name);
    for (i, seed) in (t.seeds)().iter().enumerate() {
        match somna_fuzz::execute(t, seed) {
            Ok(outcome) => assert!(outcome.accepted, "{name}: seed {i} was rejected"),
            Err(caught) => panic!("{name}: seed {i} panicked: {}", caught.message),
        }
    }
}

fn replay(name: &str) {
    let t = target(name);
    for (path, data) in regression_inputs(name) {
        if let Err(caught) = somna_fuzz::execute(t, &data) {
            panic!(
                "{name}: regression input {} panics: {}\n{}",
                path.display(),
                caught.message,
                caught.backtrace
            );
        }
    }
}

macro_rules! target_tests {
    ($($name:ident),* $(,)?) => {
        mod fuzz {
            $(#[test] fn $name() { super::fuzz(stringify!($name)); })*
        }
        mod seeds {
            $(#[test] fn $name() { super::seeds_accepted(stringify!($name)); })*
        }
        mod regressions {
            $(#[test] fn $name() { super::replay(stringify!($name)); })*
        }
    };
}

target_tests!(
    oci_layer,
    manifest,
    image_config,
    guest_request,
    controlplane_validation,
);

#[test]
fn every_target_is_tested_and_has_a_regressions_dir() {
    let tested = [
        "oci_layer",
        "manifest",
        "image_config",
        "guest_request",
        "controlplane_validation",
    ];
    for t in somna_fuzz::ALL {
        assert!(
            tested.contains(&t.name),
            "target {} has no tests here",
            t.name
        );
        assert!(
            regressions_dir(t.name).is_dir(),
            "regressions/{} is missing",
            t.name
        );
    }
    assert_eq!(somna_fuzz::ALL.len(), tested.len());
}

// --- the runner itself --------------------------------------------------

fn panics_on_magic(data: &[u8]) -> somna_fuzz::Outcome {
    // Reachable only by mutation: the seed is "MAGIC" with one byte off.
    if data.starts_with(b"MAGIC") {
        panic!("found the magic input");
    }
    somna_fuzz::Outcome::rejected(&String::from_utf8_lossy(&data[..data.len().min(2)]), "")
}

fn magic_seeds() -> Vec<Vec<u8>> {
    vec![b"MAGIc and more".to_vec()]
}

const MAGIC_TARGET: Target = Target {
    name: "test_magic",
    execute: panics_on_magic,
    seeds: magic_seeds,
    dict: &[b"C"],
    max_len: 64,
};

#[test]
fn runner_catches_a_panic_and_saves_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let options = RunOptions {
        rng_seed: 1,
        crash_dir: Some(dir.path().to_path_buf()),
        ..RunOptions::default()
    };
    let budget = Budget {
        iterations: 1_000_000,
        time: Duration::from_secs(60),
    };
    let crash = somna_fuzz::run(&MAGIC_TARGET, &[], budget, &options)
        .expect_err("the runner must find the panicking input");
    assert!(crash.input.starts_with(b"MAGIC"), "{:?}", crash.input);
    assert!(crash.iteration > 1, "the seed itself does not panic");
    assert!(
        crash.message.contains("found the magic input") && crash.message.contains("bounded.rs"),
        "the message has the payload and the location: {}",
        crash.message
    );
    assert!(!crash.backtrace.is_empty());
    let path = crash.path.clone().expect("the input was saved");
    assert!(path.starts_with(dir.path().join("test_magic")));
    assert_eq!(std::fs::read(&path).unwrap(), crash.input);
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        somna_fuzz::runner::crash_file_name(&crash.input)
    );
    assert!(crash.to_string().contains(&path.display().to_string()));

    // The same seed finds the same crash: runs are deterministic.
    let again = somna_fuzz::run(&MAGIC_TARGET, &[], budget, &options).unwrap_err();
    assert_eq!(
        (again.iteration, again.input),
        (crash.iteration, crash.input)
    );

    // Without a panic, a run stops at its iteration budget and reports it.
    let calm = Target {
        name: "test_calm",
        execute: |d| somna_fuzz::Outcome::rejected(&d.len().to_string(), ""),
        seeds: || vec![b"seed".to_vec()],
        dict: &[],
        max_len: 8,
    };
    let report = somna_fuzz::run(
        &calm,
        &[],
        Budget {
            iterations: 1000,
            time: Duration::from_secs(60),
        },
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(report.iterations, 1000);
    assert_eq!(report.accepted, 0);
    assert!(report.corpus >= 1);
}

#[test]
fn runner_catches_a_panic_inside_a_runtime_task() {
    fn spawns_a_panicking_task(data: &[u8]) -> somna_fuzz::Outcome {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let crash = data.first() == Some(&b'!');
        rt.block_on(async move {
            // tokio catches this; the runner must notice anyway.
            let _ = tokio::spawn(async move {
                if crash {
                    panic!("panic in a task");
                }
            })
            .await;
        });
        somna_fuzz::Outcome::accepted("")
    }
    let t = Target {
        name: "test_task",
        execute: spawns_a_panicking_task,
        seeds: || vec![b"?".to_vec()],
        dict: &[b"!"],
        max_len: 4,
    };
    assert!(somna_fuzz::execute(&t, b"?").is_ok());
    let caught = somna_fuzz::execute(&t, b"!").expect_err("the panic is noticed");
    assert!(
        caught.message.contains("panic in a task"),
        "{}",
        caught.message
    );
}
