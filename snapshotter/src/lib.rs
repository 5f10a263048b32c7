//! Light sleep for Somna sandboxes: snapshot a VM's device state and memory,
//! release its host RAM, and restore it on wake; template snapshots and warm
//! pools build on the same machinery.
//!
//! This crate is intentionally empty until the light-sleep issue lands: no
//! sandbox can be put to sleep yet, and nothing here claims otherwise.
