//! Layer application: whiteouts, opaque directories, links, confinement,
//! metadata. Runs the unpacker on hand-written tar layers.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{Tar, require_root};
use somna_images::{ErrorKind, ImageError, Unpacker};

fn unpack(layers: &[Vec<u8>]) -> (tempfile::TempDir, Result<(), ImageError>) {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let result = (|| {
        let mut u = Unpacker::new(&root)?;
        for (i, l) in layers.iter().enumerate() {
            u.apply(&format!("layer{i}"), &l[..])?;
        }
        u.finish()
    })();
    (tmp, result)
}

fn root(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    tmp.path().join("rootfs")
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

#[test]
fn whiteouts_remove_lower_entries() {
    let l1 = Tar::new()
        .dir("etc")
        .file("etc/keep", b"keep")
        .file("etc/gone", b"gone")
        .dir("var")
        .dir("var/lib")
        .file("var/lib/data", b"d")
        .build();
    let l2 = Tar::new()
        .whiteout("etc/gone")
        .whiteout("var/lib")
        .whiteout("does/not/exist")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    assert_eq!(fs::read(r.join("etc/keep")).unwrap(), b"keep");
    assert!(!exists(&r.join("etc/gone")));
    assert!(!exists(&r.join("var/lib")));
    assert!(exists(&r.join("var")));
    // Whiteout files themselves never appear.
    assert!(!exists(&r.join("etc/.wh.gone")));
    assert!(!exists(&r.join("does")));
}

#[test]
fn whiteout_then_recreate_in_same_layer() {
    let l1 = Tar::new().dir("a").file("a/old", b"old").build();
    // The layer removes lower "a" and adds a new "a" with other content.
    let l2 = Tar::new()
        .whiteout("a")
        .dir("a")
        .file("a/new", b"new")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    assert!(!exists(&r.join("a/old")));
    assert_eq!(fs::read(r.join("a/new")).unwrap(), b"new");

    // Whiteout after the same layer's own entry: hides lower layers only.
    let l1 = Tar::new().file("x", b"lower").build();
    let l2 = Tar::new().file("x", b"upper").whiteout("x").build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    assert_eq!(fs::read(root(&tmp).join("x")).unwrap(), b"upper");
}

#[test]
fn opaque_directories_hide_lower_content_only() {
    let l1 = Tar::new()
        .dir("app")
        .file("app/lower1", b"1")
        .dir("app/sub")
        .file("app/sub/lower2", b"2")
        .file("outside", b"o")
        .build();
    // Marker after this layer's entries: they stay.
    let l2 = Tar::new()
        .dir("app")
        .file("app/upper", b"u")
        .dir("app/sub")
        .file("app/sub/upper2", b"u2")
        .opaque("app")
        .build();
    let (tmp, r) = unpack(&[l1.clone(), l2]);
    r.unwrap();
    let r = root(&tmp);
    assert!(!exists(&r.join("app/lower1")));
    assert!(
        !exists(&r.join("app/sub/lower2")),
        "lower content under a re-declared subdir goes too"
    );
    assert_eq!(fs::read(r.join("app/upper")).unwrap(), b"u");
    assert_eq!(fs::read(r.join("app/sub/upper2")).unwrap(), b"u2");
    assert!(!exists(&r.join("app/.wh..wh..opq")));
    assert_eq!(fs::read(r.join("outside")).unwrap(), b"o");

    // Marker first (the usual order).
    let l2 = Tar::new()
        .dir("app")
        .opaque("app")
        .file("app/upper", b"u")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    let mut names: Vec<_> = fs::read_dir(r.join("app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["upper"]);
}

#[test]
fn later_layers_replace_entries_of_other_types() {
    let l1 = Tar::new()
        .dir("d")
        .file("d/f", b"x")
        .file("f", b"file")
        .symlink("s", "/etc/passwd")
        .build();
    let l2 = Tar::new()
        .file("d", b"now a file")
        .dir("f")
        .file("s", b"no longer a symlink")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    assert_eq!(fs::read(r.join("d")).unwrap(), b"now a file");
    assert!(r.join("f").is_dir());
    let m = fs::symlink_metadata(r.join("s")).unwrap();
    assert!(m.is_file());
    assert_eq!(fs::read(r.join("s")).unwrap(), b"no longer a symlink");
}

#[test]
fn hard_links_within_and_across_layers() {
    let l1 = Tar::new()
        .dir("bin")
        .file_owned("bin/tool", b"#!tool", 0o755, 0, 0)
        .build();
    let l2 = Tar::new()
        .hardlink("bin/tool-alias", "bin/tool")
        .file("lib/own", b"own")
        .hardlink("lib/own-link", "lib/own")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    let a = fs::metadata(r.join("bin/tool")).unwrap();
    let b = fs::metadata(r.join("bin/tool-alias")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    let c = fs::metadata(r.join("lib/own")).unwrap();
    let d = fs::metadata(r.join("lib/own-link")).unwrap();
    assert_eq!(c.ino(), d.ino());

    // A link to something that is not there is an error naming the entry.
    let (_tmp, r) = unpack(&[Tar::new().hardlink("x", "missing").build()]);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(e.kind(), ErrorKind::DataLoss);
}

#[test]
fn symlinked_parents_cannot_escape_the_root() {
    require_root();
    let outside = tempfile::tempdir().unwrap();
    let outside_s = outside.path().to_str().unwrap();
    let l1 = Tar::new()
        .symlink("abs", outside_s)
        .symlink("rel", "../../../../../../..")
        .dir("etc")
        .symlink("loop", "loop")
        .build();
    let l2 = Tar::new()
        .file("abs/evil", b"abs")
        .file("rel/evil2", b"rel")
        .build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    let r = root(&tmp);
    assert!(
        !outside.path().join("evil").exists(),
        "wrote through an absolute symlink"
    );
    // Resolved as inside the guest: <root>/<outside>/evil and <root>/evil2.
    let inside = r
        .join(outside.path().strip_prefix("/").unwrap())
        .join("evil");
    assert_eq!(fs::read(inside).unwrap(), b"abs");
    assert_eq!(fs::read(r.join("evil2")).unwrap(), b"rel");
    assert!(!tmp.path().join("evil2").exists());
    // The symlinks themselves are untouched.
    assert!(
        fs::symlink_metadata(r.join("abs"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // A hard link through a symlinked parent cannot reach a host file.
    fs::write(outside.path().join("secret"), b"host secret").unwrap();
    let l1 = Tar::new().symlink("h", outside_s).build();
    let l2 = Tar::new().hardlink("stolen", "h/secret").build();
    let (tmp, r) = unpack(&[l1, l2]);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!root(&tmp).join("stolen").exists());
    assert_eq!(
        fs::metadata(outside.path().join("secret")).unwrap().nlink(),
        1
    );

    // Symlink loops are an error, not a hang.
    let l1 = Tar::new().symlink("loop", "loop").build();
    let l2 = Tar::new().file("loop/x", b"").build();
    let (_tmp, r) = unpack(&[l1, l2]);
    assert!(r.unwrap_err().to_string().contains("too many levels"));

    // The final component is never followed: the entry replaces the link.
    fs::write(outside.path().join("target"), b"host").unwrap();
    let l1 = Tar::new()
        .symlink("t", &format!("{outside_s}/target"))
        .build();
    let l2 = Tar::new().file("t", b"image").build();
    let (tmp, r) = unpack(&[l1, l2]);
    r.unwrap();
    assert_eq!(fs::read(outside.path().join("target")).unwrap(), b"host");
    assert_eq!(fs::read(root(&tmp).join("t")).unwrap(), b"image");
}

#[test]
fn dotdot_and_absolute_entries_are_rejected() {
    for name in [&b"../evil"[..], b"a/../../evil", b"/etc/evil", b"./.."] {
        let (tmp, r) = unpack(&[Tar::new().raw_file(name, b"x").build()]);
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("layer0") && msg.contains("not allowed"),
            "{msg}"
        );
        assert!(!tmp.path().join("evil").exists());
    }
    for target in [&b"../etc/passwd"[..], b"/etc/passwd"] {
        let (tmp, r) = unpack(&[Tar::new().raw_hardlink("pw", target).build()]);
        assert!(r.unwrap_err().to_string().contains("not allowed"));
        assert!(!root(&tmp).join("pw").exists());
    }
}

#[test]
fn metadata_is_preserved() {
    let l1 = Tar::new()
        .dir_owned("home", 0o755, 0, 0)
        .dir_owned("home/user", 0o750, 1000, 1000)
        .dir_owned("tmp", 0o1777, 0, 0)
        .file_owned("bin-su", b"su", 0o4755, 0, 0)
        .file_owned("sgid", b"x", 0o2711, 0, 42)
        .file_owned("home/user/notes", b"n", 0o600, 1000, 1000)
        .file_with_xattrs(
            "caps",
            b"c",
            &[("user.somna", b"hello"), ("trusted.bin", &[0, 1, 2])],
        )
        .symlink("link", "bin-su")
        .char_device("null", 1, 3)
        .fifo("pipe")
        .build();
    let (tmp, r) = unpack(&[l1]);
    r.unwrap();
    let r = root(&tmp);
    let m = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
    assert_eq!(m("home/user").mode() & 0o7777, 0o750);
    assert_eq!((m("home/user").uid(), m("home/user").gid()), (1000, 1000));
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(m("bin-su").mode() & 0o7777, 0o4755);
    assert_eq!(m("sgid").mode() & 0o7777, 0o2711);
    assert_eq!(m("sgid").gid(), 42);
    assert_eq!(m("home/user/notes").uid(), 1000);
    assert_eq!(
        xattr::get(r.join("caps"), "user.somna").unwrap().unwrap(),
        b"hello"
    );
    assert_eq!(
        xattr::get(r.join("caps"), "trusted.bin").unwrap().unwrap(),
        vec![0, 1, 2]
    );
    assert_eq!(fs::read_link(r.join("link")).unwrap(), Path::new("bin-su"));
    assert!(m("null").file_type().is_char_device());
    assert_eq!(m("null").rdev(), nix::sys::stat::makedev(1, 3));
    assert!(m("pipe").file_type().is_fifo());
    // mtimes, directories included (set after all their children).
    for p in ["home", "home/user", "tmp", "bin-su", "link", "null", "pipe"] {
        assert_eq!(m(p).mtime(), 1_600_000_000, "{p}");
    }
}

#[test]
fn garbage_is_an_error() {
    let (_tmp, r) = unpack(&[b"this is not a tar archive, not at all; it is long enough to be read as a header block? no: too short".repeat(8)]);
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
}
