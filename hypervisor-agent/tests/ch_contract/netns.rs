//! A network namespace for one test.

use std::path::{Path, PathBuf};

/// A network namespace of the test's own, standing in for a netd slot:
/// the driver opens (and so creates) the VMs' TAPs there, and they go
/// with their last descriptor. Removed on drop, also when a test fails.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        let name = format!("somna-chc-{}-{tag}", std::process::id());
        let out = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name} (the contract tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestNetns { name }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
