//! `somna-fuzz`: Somna's fuzz targets (issue 10) and a small, deterministic,
//! bounded mutation fuzzer that runs them on stable Rust.
//!
//! This crate owns:
//!
//! - **The targets**, one `pub fn <target>(data: &[u8])` each, which must
//!   never panic on any input and assert cheap invariants of the code they
//!   drive (see each module in [`targets`]):
//!   - [`oci_layer`]: applying an image layer tar (plain or gzip) with
//!     `somna_images::Unpacker`; nothing may appear outside the unpack
//!     directory;
//!   - [`manifest`], [`image_config`]: OCI index, manifest and config JSON
//!     through `ImageStore::resolve` on a local layout;
//!   - [`guest_request`]: the guest agent's handling of the host's bytes:
//!     serial session framing (the agent's `h2sync`), HTTP/2, gRPC framing
//!     and prost decoding of every `somna.guest.v1` request;
//!   - [`controlplane_validation`]: `somna.v1` requests decoded from bytes
//!     through the control plane's validators.
//! - **The runner** ([`run`]): seeds first, then stacked AFL-style
//!   mutations (bit flips, interesting values, insert/delete/copy, dictionary
//!   tokens, splicing) from a seeded PRNG, keeping inputs with new outcomes;
//!   bounded by iterations and time; a panic is caught, its input written
//!   under a crash directory and returned as [`Crash`].
//! - **Regression inputs**: `regressions/<target>/` (every file there is
//!   replayed by `tests/bounded.rs`; crashes the fuzzer finds go there).
//! - **`fuzz-long`**: the same runner for longer, with JSON summaries
//!   (`bench/fuzz.sh`).
//!
//! The cargo-fuzz project in `fuzz/` (libFuzzer, nightly only) calls the
//! same `pub fn`s; it is outside the workspace and not built in CI.

pub mod mutate;
pub mod runner;
pub mod targets;

pub use runner::{Budget, Crash, Outcome, Report, RunOptions, execute, run};
pub use targets::{ALL, Target, by_name};

/// Applies `data` as an OCI layer (twice, as lower and upper layer) into a
/// fresh temporary directory; asserts nothing escaped it.
pub fn oci_layer(data: &[u8]) {
    targets::oci_layer::execute(data);
}

/// Resolves an image whose manifest, `index.json` or nested index (picked
/// by the first byte) is `data[1..]`.
pub fn manifest(data: &[u8]) {
    targets::images::execute_manifest(data);
}

/// Resolves an image whose config blob is `data`.
pub fn image_config(data: &[u8]) {
    targets::images::execute_config(data);
}

/// Feeds `data` to the guest agent's request path: a serial byte stream
/// (even first byte) or one RPC's gRPC request body (odd).
pub fn guest_request(data: &[u8]) {
    targets::guest::execute(data);
}

/// Decodes a control plane request (picked by the first byte) and validates
/// it.
pub fn controlplane_validation(data: &[u8]) {
    targets::controlplane::execute(data);
}

/// Drops state the targets keep per thread (the image targets' store and
/// its temporary directory). Threads that exit drop it by themselves.
pub fn reset_thread_state() {
    targets::images::reset_thread_state();
}
