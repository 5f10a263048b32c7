//! The fuzz targets: one module per owning crate, registered in [`ALL`].

pub mod controlplane;
pub mod guest;
pub mod images;
pub mod oci_layer;

use crate::runner::Outcome;

/// A fuzz target as the runner drives it.
pub struct Target {
    pub name: &'static str,
    /// Runs one input; panics on a bug.
    pub execute: fn(&[u8]) -> Outcome,
    /// Small valid inputs built in code.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens of the input format, for the mutator.
    pub dict: &'static [&'static [u8]],
    /// Mutated inputs never grow past this.
    pub max_len: usize,
}

/// Every target, in a fixed order.
pub const ALL: &[Target] = &[
    Target {
        name: "oci_layer",
        execute: oci_layer::execute,
        seeds: oci_layer::seeds,
        dict: oci_layer::DICT,
        max_len: 64 << 10,
    },
    Target {
        name: "manifest",
        execute: images::execute_manifest,
        seeds: images::manifest_seeds,
        dict: images::DICT,
        max_len: 16 << 10,
    },
    Target {
        name: "image_config",
        execute: images::execute_config,
        seeds: images::config_seeds,
        dict: images::DICT,
        max_len: 16 << 10,
    },
    Target {
        name: "guest_request",
        execute: guest::execute,
        seeds: guest::seeds,
        dict: guest::DICT,
        max_len: 16 << 10,
    },
    Target {
        name: "controlplane_validation",
        execute: controlplane::execute,
        seeds: controlplane::seeds,
        dict: controlplane::DICT,
        max_len: 4 << 10,
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}
