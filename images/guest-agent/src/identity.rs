//! Who this guest is: the sandbox id, the hostname and `/etc/machine-id`.
//!
//! The id and hostname come from the kernel command line (or the dev-mode
//! flags) and can be replaced by `Wake` when the VM is a clone of a template
//! snapshot. They live in one [`SharedIdentity`] that exec (the
//! `ExecStart.sandbox_id` check and `HOSTNAME`), the files API (its
//! `sandbox_id` checks) and Health all read, so a new identity applies to
//! every request that starts after `Wake` answered.
//!
//! The machine id lives only in the sandbox root's `/etc/machine-id`
//! (that file is what processes read); it is written atomically, mode 0444.

use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use tonic::Status;

use crate::files::{self, FsError, Root};

/// Where the machine id lives, inside the sandbox root.
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// Longest sandbox id accepted from `Wake`.
const MAX_SANDBOX_ID: usize = 128;
/// Longest hostname the kernel takes (`HOST_NAME_MAX` on Linux).
const MAX_HOSTNAME: usize = 64;

/// The parts of the identity that the agent keeps in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIdentity {
    pub sandbox_id: String,
    pub hostname: String,
}

/// The identity, shared by every RPC handler.
#[derive(Debug, Clone)]
pub struct SharedIdentity(Arc<RwLock<GuestIdentity>>);

impl SharedIdentity {
    pub fn new(sandbox_id: String, hostname: String) -> SharedIdentity {
        SharedIdentity(Arc::new(RwLock::new(GuestIdentity {
            sandbox_id,
            hostname,
        })))
    }

    /// A snapshot of the current identity.
    pub fn get(&self) -> GuestIdentity {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn sandbox_id(&self) -> String {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .sandbox_id
            .clone()
    }

    pub fn set(&self, new: GuestIdentity) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    /// `Ok` when `requested` is empty (no check asked) or names this sandbox.
    pub fn check(&self, requested: &str) -> Result<(), Status> {
        if requested.is_empty() {
            return Ok(());
        }
        let current = self.sandbox_id();
        if requested == current {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "this guest runs sandbox {current:?}, not {requested:?}"
            )))
        }
    }
}

/// Whether `id` is a machine id as systemd defines it: 32 lowercase hex
/// digits, not all zero.
pub fn is_valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0')
}

/// Formats 16 random bytes as a machine id (a version-4 UUID without dashes,
/// like `systemd-machine-id-setup`).
fn machine_id_from(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `buf` from the kernel's CSPRNG (getrandom(2); it waits only until
/// the RNG is initialised, once per boot).
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// A new random machine id.
pub fn generate_machine_id() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    Ok(machine_id_from(bytes))
}

/// The root's machine id, trimmed; empty when the file is missing or
/// unreadable.
pub fn read_machine_id(root: &Root) -> String {
    match root.read_small(MACHINE_ID_PATH) {
        Ok(Some(text)) => text.trim().to_string(),
        Ok(None) => String::new(),
        Err(e) => {
            tracing::debug!("reading the machine id: {e}");
            String::new()
        }
    }
}

/// Writes `id` (already validated) to the root's `/etc/machine-id`.
pub fn write_machine_id(root: &Root, id: &str) -> Result<(), FsError> {
    files::replace_small(root, MACHINE_ID_PATH, format!("{id}\n").as_bytes(), 0o444)
}

/// First boot (PID 1, after switching root): gives the sandbox a machine id
/// of its own unless it already has one. `image_only` says the file, if
/// any, comes from the read-only image rather than the sandbox's writable
/// layer: such an id is shared by every sandbox of the image, so it is
/// replaced too. Returns the id in use.
pub fn ensure_machine_id(root: &Root, image_only: bool) -> Result<String, String> {
    let current = read_machine_id(root);
    if is_valid_machine_id(&current) && !image_only {
        tracing::debug!("machine id {current}");
        return Ok(current);
    }
    let id = generate_machine_id().map_err(|e| format!("generate a machine id: {e}"))?;
    write_machine_id(root, &id).map_err(|e| format!("write the machine id: {e}"))?;
    if current.is_empty() || current == "uninitialized" {
        tracing::info!("new machine id {id}");
    } else {
        let why = if image_only {
            "the image's own"
        } else {
            "invalid"
        };
        tracing::info!("new machine id {id} (replaced {why} {current:?})");
    }
    Ok(id)
}

/// A new identity from `Wake`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdentity {
    pub sandbox_id: String,
    pub hostname: String,
    pub machine_id: String,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("identity.{field}: {why}"))
}

fn is_hostname_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

impl NewIdentity {
    /// Validates the fields of a `somna.guest.v1.Identity`. An empty
    /// hostname means the sandbox id (as on the kernel command line).
    pub fn validate(id: &somna_proto::guest::v1::Identity) -> Result<NewIdentity, Status> {
        let sandbox_id = id.sandbox_id.as_str();
        if sandbox_id.is_empty() {
            return Err(invalid("sandbox_id", "is empty"));
        }
        if sandbox_id.len() > MAX_SANDBOX_ID {
            return Err(invalid(
                "sandbox_id",
                format!("is longer than {MAX_SANDBOX_ID} bytes"),
            ));
        }
        if sandbox_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "sandbox_id",
                format!("{sandbox_id:?} contains whitespace or control characters"),
            ));
        }
        let hostname = if id.hostname.is_empty() {
            sandbox_id
        } else {
            id.hostname.as_str()
        };
        if hostname.len() > MAX_HOSTNAME {
            return Err(invalid(
                "hostname",
                format!("{hostname:?} is longer than {MAX_HOSTNAME} bytes"),
            ));
        }
        if !hostname.bytes().all(is_hostname_byte) || hostname.starts_with(['-', '.']) {
            return Err(invalid(
                "hostname",
                format!(
                    "{hostname:?} is not a valid hostname (letters, digits, '-', '.', '_'; \
                     not starting with '-' or '.')"
                ),
            ));
        }
        if !is_valid_machine_id(&id.machine_id) {
            return Err(invalid(
                "machine_id",
                format!(
                    "{:?} is not 32 lowercase hex digits (and not all zero)",
                    id.machine_id
                ),
            ));
        }
        Ok(NewIdentity {
            sandbox_id: sandbox_id.to_string(),
            hostname: hostname.to_string(),
            machine_id: id.machine_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use somna_proto::guest::v1::Identity;

    use super::*;

    #[test]
    fn machine_id_validation() {
        assert!(is_valid_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_valid_machine_id(""));
        assert!(!is_valid_machine_id("uninitialized"));
        assert!(!is_valid_machine_id("0123456789ABCDEF0123456789ABCDEF"));
        assert!(!is_valid_machine_id("0123456789abcdef0123456789abcde"));
        assert!(!is_valid_machine_id("0123456789abcdef0123456789abcdef0"));
        assert!(!is_valid_machine_id("0123456789abcdef0123456789abcdeg"));
        assert!(!is_valid_machine_id("0123456789abcdef0123456789abcde\n"));
        assert!(!is_valid_machine_id("00000000000000000000000000000000"));
    }

    #[test]
    fn machine_id_generation() {
        let a = generate_machine_id().unwrap();
        let b = generate_machine_id().unwrap();
        assert!(is_valid_machine_id(&a), "{a}");
        assert!(is_valid_machine_id(&b), "{b}");
        assert_ne!(a, b);
        // Version 4, RFC 4122 variant.
        assert_eq!(&a[12..13], "4");
        assert!(matches!(&a[16..17], "8" | "9" | "a" | "b"), "{a}");
        assert_eq!(machine_id_from([0; 16]), "00000000000040008000000000000000");
        assert_eq!(
            machine_id_from([0xff; 16]),
            "ffffffffffff4fffbfffffffffffffff"
        );
    }

    #[test]
    fn ensure_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        // No /etc at all: created.
        let id = ensure_machine_id(&root, false).unwrap();
        let path = dir.path().join("etc/machine-id");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{id}\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o444);
        // A valid one is kept...
        assert_eq!(ensure_machine_id(&root, false).unwrap(), id);
        assert_eq!(read_machine_id(&root), id);
        // ...unless it is the image's.
        let other = ensure_machine_id(&root, true).unwrap();
        assert_ne!(other, id);
        // "uninitialized" and empty files are replaced.
        for text in ["uninitialized\n", "", "\n"] {
            std::fs::remove_file(&path).unwrap();
            std::fs::write(&path, text).unwrap();
            let new = ensure_machine_id(&root, false).unwrap();
            assert!(is_valid_machine_id(&new));
            assert_eq!(read_machine_id(&root), new);
        }
        // No leftover temp files.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("machine-id")]);
    }

    #[test]
    fn identity_validation() {
        let ok = Identity {
            sandbox_id: "sbx-abc123".into(),
            hostname: "box-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        };
        let v = NewIdentity::validate(&ok).unwrap();
        assert_eq!(v.hostname, "box-1");
        let v = NewIdentity::validate(&Identity {
            hostname: String::new(),
            ..ok.clone()
        })
        .unwrap();
        assert_eq!(v.hostname, "sbx-abc123");

        let field_of = |id: Identity| {
            let e = NewIdentity::validate(&id).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            e.message().to_string()
        };
        for bad in ["", "a b", "tab\t", &"x".repeat(129)] {
            let m = field_of(Identity {
                sandbox_id: bad.into(),
                ..ok.clone()
            });
            assert!(m.starts_with("identity.sandbox_id"), "{m}");
        }
        for bad in ["-box", ".box", "my box", "a/b", &"h".repeat(65)] {
            let m = field_of(Identity {
                hostname: bad.into(),
                ..ok.clone()
            });
            assert!(m.starts_with("identity.hostname"), "{m}");
        }
        for bad in ["", "xyz", "0123456789ABCDEF0123456789ABCDEF"] {
            let m = field_of(Identity {
                machine_id: bad.into(),
                ..ok.clone()
            });
            assert!(m.starts_with("identity.machine_id"), "{m}");
        }
    }

    #[test]
    fn shared_check() {
        let s = SharedIdentity::new("a".into(), "h".into());
        assert!(s.check("").is_ok());
        assert!(s.check("a").is_ok());
        assert_eq!(
            s.check("b").unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        s.set(GuestIdentity {
            sandbox_id: "b".into(),
            hostname: "hb".into(),
        });
        assert!(s.check("b").is_ok());
        assert!(s.check("a").is_err());
        assert_eq!(s.get().hostname, "hb");
    }
}
