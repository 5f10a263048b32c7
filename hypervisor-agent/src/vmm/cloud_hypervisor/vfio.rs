//! GPU groundwork: finding the host's GPUs that are bound to `vfio-pci`
//! (ready for passthrough). Attaching and detaching is `vm.add-device` /
//! `vm.remove-device` on a running VM ([`crate::vmm::Vm::add_device`]).
//! VFIO devices cannot be snapshotted: light sleep of GPU sandboxes (detach
//! before, re-attach after) comes later, and until then a VM with devices
//! attached refuses to save its state.

use std::path::Path;

use crate::vmm::VfioDevice;

/// PCI base class of display controllers (VGA, 3D, ...).
const PCI_CLASS_DISPLAY: u32 = 0x03;

/// GPUs bound to `vfio-pci` on this host.
pub fn host_gpus() -> Vec<VfioDevice> {
    gpus_in(Path::new("/sys"))
}

/// [`host_gpus`] below another sysfs root (for tests).
pub fn gpus_in(sysfs: &Path) -> Vec<VfioDevice> {
    let driver = sysfs.join("bus/pci/drivers/vfio-pci");
    let Ok(entries) = std::fs::read_dir(&driver) else {
        return Vec::new();
    };
    let mut gpus: Vec<VfioDevice> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_pci_address(&name) {
                return None;
            }
            let class = std::fs::read_to_string(driver.join(&name).join("class")).ok()?;
            let class = u32::from_str_radix(class.trim().trim_start_matches("0x"), 16).ok()?;
            (class >> 16 == PCI_CLASS_DISPLAY).then(|| VfioDevice {
                path: sysfs.join("bus/pci/devices").join(&name),
                id: None,
            })
        })
        .collect();
    gpus.sort_by(|a, b| a.path.cmp(&b.path));
    gpus
}

/// `dddd:bb:dd.f`
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_display_controllers_bound_to_vfio() {
        let sys = tempfile::tempdir().unwrap();
        let driver = sys.path().join("bus/pci/drivers/vfio-pci");
        for (bdf, class) in [
            ("0000:65:00.0", "0x030200"),
            ("0000:17:00.0", "0x030000"),
            ("0000:18:00.0", "0x020000"),
        ] {
            std::fs::create_dir_all(driver.join(bdf)).unwrap();
            std::fs::write(driver.join(bdf).join("class"), format!("{class}\n")).unwrap();
        }
        std::fs::write(driver.join("bind"), b"").unwrap();
        let gpus = gpus_in(sys.path());
        let names: Vec<_> = gpus
            .iter()
            .map(|g| g.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["0000:17:00.0", "0000:65:00.0"]);
        assert!(gpus[0].path.starts_with(sys.path().join("bus/pci/devices")));
        assert!(gpus_in(&sys.path().join("nothing")).is_empty());
        assert!(!is_pci_address("new_id"));
    }
}
