//! `manifest` and `image_config`: OCI image index, manifest and config JSON
//! as `somna_images` reads them, through the public entry point the host
//! agent uses, `ImageStore::resolve` on a local OCI layout.
//!
//! Each thread keeps one store whose local directory holds one layout,
//! `fuzz/`; every input rewrites that layout's `index.json` and blobs (with
//! digests and sizes computed, so inputs get past verification and reach
//! the parsers) and resolves references in it. That covers `Layout::open`,
//! `index.json` and tag matching, nested indexes and platform choice,
//! manifest and config parsing and their consistency checks, and
//! `ImageConfig::from_oci`.
//!
//! `manifest`: the first byte picks what the rest of the input is (the
//! other documents are valid and fixed):
//!
//! - `0`: the manifest (`index.json` points at it; the config is valid);
//! - `1`: `index.json` itself (blobs hold a valid manifest, its config and
//!   a nested index pointing at the manifest);
//! - `2`: a nested image index (`index.json` points at it).
//!
//! `image_config`: the input is the config; the manifest is generated with
//! as many layers as the input's `rootfs.diff_ids` (when it parses loosely
//! as JSON), so consistent configs reach `ImageConfig::from_oci`.

use std::cell::RefCell;
use std::fs;
use std::path::PathBuf;

use serde_json::{Value, json};
use somna_images::{
    Digest, Image, ImageError, ImageStore, ImageStoreConfig, MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};

use crate::runner::Outcome;

/// Inputs between two fresh stores (records of digest references pile up
/// in the cache otherwise).
const EXECS_PER_STORE: u32 = 2000;
/// Layers generated for a config at most.
const MAX_LAYERS: usize = 32;

pub const DICT: &[&[u8]] = &[
    b"\"schemaVersion\":2,",
    b"\"mediaType\":",
    b"\"application/vnd.oci.image.manifest.v1+json\"",
    b"\"application/vnd.oci.image.index.v1+json\"",
    b"\"application/vnd.oci.image.config.v1+json\"",
    b"\"application/vnd.docker.distribution.manifest.v2+json\"",
    b"\"application/vnd.docker.distribution.manifest.list.v2+json\"",
    b"\"application/vnd.oci.image.layer.v1.tar+zstd\"",
    b"\"application/vnd.oci.image.layer.v1.tar\"",
    b"\"digest\":\"sha256:",
    b"\"size\":",
    b"\"manifests\":[",
    b"\"layers\":[",
    b"\"config\":{",
    b"\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"}",
    b"\"annotations\":{\"org.opencontainers.image.ref.name\":\"latest\"}",
    b"\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[",
    b"\"Env\":[",
    b"\"ExposedPorts\":{",
    b"\"Entrypoint\":",
    b"\"Cmd\":",
    b"\"User\":",
    b"\"WorkingDir\":",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"-1",
    b"18446744073709551616",
    b"1e400",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
];

const REF_LATEST: &str = "fuzz:latest";

struct Ctx {
    // Dropped in this order: the store (it holds the cache lock file) before
    // the directory it lives in.
    store: ImageStore,
    rt: tokio::runtime::Runtime,
    layout: PathBuf,
    execs: u32,
    _tmp: tempfile::TempDir,
}

impl Ctx {
    fn new() -> Ctx {
        let tmp = tempfile::Builder::new()
            .prefix("somna-fuzz-images.")
            .tempdir()
            .expect("cannot create a temporary directory for the image targets");
        let layouts = tmp.path().join("layouts");
        let layout = layouts.join("fuzz");
        fs::create_dir_all(layout.join("blobs/sha256")).expect("cannot create the layout");
        fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("cannot write oci-layout");
        let store = ImageStore::new(ImageStoreConfig {
            local_dirs: vec![layouts],
            cache_dir: tmp.path().join("cache"),
        })
        .expect("cannot open an image store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        Ctx {
            store,
            rt,
            layout,
            execs: 0,
            _tmp: tmp,
        }
    }

    /// Empties the layout's blobs and `index.json`.
    fn clear(&self) {
        let blobs = self.layout.join("blobs/sha256");
        for e in fs::read_dir(&blobs).expect("cannot list the layout's blobs") {
            let p = e.expect("cannot list the layout's blobs").path();
            fs::remove_file(&p).expect("cannot remove a blob");
        }
        let _ = fs::remove_file(self.layout.join("index.json"));
    }

    fn put_blob(&self, data: &[u8]) -> (Digest, u64) {
        let d = Digest::of(data);
        fs::write(self.layout.join("blobs/sha256").join(d.hex()), data)
            .expect("cannot write a blob");
        (d, data.len() as u64)
    }

    fn put_index_json(&self, data: &[u8]) {
        fs::write(self.layout.join("index.json"), data).expect("cannot write index.json");
    }

    fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        self.rt.block_on(self.store.resolve(reference))
    }

    fn strip(&self) -> String {
        self.layout.display().to_string()
    }
}

thread_local! {
    /// The thread's store; `None` until first used, and again after an
    /// input panicked (its layout may be half-written).
    static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's context, making a fresh one when needed.
fn with_ctx<T>(f: impl FnOnce(&Ctx) -> T) -> T {
    CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.execs >= EXECS_PER_STORE) {
            *slot = None;
            *slot = Some(Ctx::new());
        }
        let ctx = slot.take().expect("just made");
        let out = f(&ctx);
        // Put it back only when `f` returned (a panic drops it).
        let mut ctx = ctx;
        ctx.execs += 1;
        *slot = Some(ctx);
        out
    })
}

/// Drops this thread's image store and its temporary directory.
pub fn reset_thread_state() {
    CTX.with(|cell| cell.borrow_mut().take());
}

fn config_json() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "EMPTY", "A=b=c"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
            "Labels": {"org.example": "x"}
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "d".repeat(64))]},
        "history": [{"created_by": "fuzz"}]
    }))
    .expect("JSON")
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
}

fn manifest_json(config: (&Digest, u64), layers: usize) -> Vec<u8> {
    let layers: Vec<Value> = (0..layers)
        .map(|i| {
            let d = Digest::from_hex(&format!("{:064x}", i + 1)).expect("hex");
            descriptor(MEDIA_TYPE_LAYER_GZIP, &d, 1000 + i as u64)
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": descriptor(MEDIA_TYPE_OCI_CONFIG, config.0, config.1),
        "layers": layers,
        "annotations": {"org.opencontainers.image.title": "fuzz"}
    }))
    .expect("JSON")
}

/// A nested index with an arm64 and an amd64 entry for the manifest.
fn nested_index_json(manifest: (&Digest, u64)) -> Vec<u8> {
    let mut arm = descriptor(MEDIA_TYPE_OCI_MANIFEST, manifest.0, manifest.1);
    arm["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let mut amd = descriptor(MEDIA_TYPE_OCI_MANIFEST, manifest.0, manifest.1);
    amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": [arm, amd]
    }))
    .expect("JSON")
}

fn index_json(entries: &[(&str, &Digest, u64, &str)]) -> Vec<u8> {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(mt, d, size, tag)| {
            let mut v = descriptor(mt, d, *size);
            v["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
            v
        })
        .collect();
    serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).expect("JSON")
}

/// The valid documents: config, manifest, nested index (with digests).
struct Docs {
    config: Vec<u8>,
    manifest: Vec<u8>,
    nested: Vec<u8>,
}

fn docs() -> &'static Docs {
    static DOCS: std::sync::OnceLock<Docs> = std::sync::OnceLock::new();
    DOCS.get_or_init(make_docs)
}

fn make_docs() -> Docs {
    let config = config_json();
    let cd = Digest::of(&config);
    let manifest = manifest_json((&cd, config.len() as u64), 1);
    let md = Digest::of(&manifest);
    let nested = nested_index_json((&md, manifest.len() as u64));
    Docs {
        config,
        manifest,
        nested,
    }
}

/// Checks what a resolved image must be whatever the fuzzed document: the
/// only manifest and config that can pass verification are the fixed ones.
fn check_fixed_image(image: &Image, docs: &Docs, manifest: &[u8]) {
    assert_eq!(image.manifest_digest, Digest::of(manifest));
    assert_eq!(image.config_digest, Digest::of(&docs.config));
    assert_eq!(image.layers.len(), 1, "the fixed config has one diff_id");
    assert_eq!(image.config.default_argv(), ["/bin/sh", "-c", "echo hello"]);
}

fn outcome(ctx: &Ctx, results: &[Result<Image, ImageError>]) -> Outcome {
    let mut text = String::new();
    let mut accepted = false;
    for r in results {
        match r {
            Ok(_) => {
                accepted = true;
                text.push_str("ok;");
            }
            Err(e) => text.push_str(&format!("{:?} {e};", e.kind())),
        }
    }
    if accepted {
        Outcome::accepted(&text)
    } else {
        Outcome::rejected(&text, &ctx.strip())
    }
}

pub fn execute_manifest(data: &[u8]) -> Outcome {
    let Some((&mode, body)) = data.split_first() else {
        return Outcome::rejected("empty", "");
    };
    let docs = docs();
    with_ctx(|ctx| {
        ctx.clear();
        ctx.put_blob(&docs.config);
        let mut results = Vec::new();
        match mode % 3 {
            0 => {
                let (d, size) = ctx.put_blob(body);
                ctx.put_index_json(&index_json(&[(
                    MEDIA_TYPE_OCI_MANIFEST,
                    &d,
                    size,
                    "latest",
                )]));
                for r in [REF_LATEST.to_string(), format!("fuzz@{d}")] {
                    let res = ctx.resolve(&r);
                    if let Ok(image) = &res {
                        check_fixed_image(image, docs, body);
                    }
                    results.push(res);
                }
            }
            1 => {
                let (md, _) = ctx.put_blob(&docs.manifest);
                ctx.put_blob(&docs.nested);
                ctx.put_index_json(body);
                for r in [
                    REF_LATEST.to_string(),
                    "fuzz:v2".to_string(),
                    format!("fuzz@{md}"),
                ] {
                    let res = ctx.resolve(&r);
                    if let Ok(image) = &res {
                        check_fixed_image(image, docs, &docs.manifest);
                    }
                    results.push(res);
                }
            }
            _ => {
                ctx.put_blob(&docs.manifest);
                let (d, size) = ctx.put_blob(body);
                ctx.put_index_json(&index_json(&[(MEDIA_TYPE_OCI_INDEX, &d, size, "latest")]));
                let res = ctx.resolve(REF_LATEST);
                if let Ok(image) = &res {
                    check_fixed_image(image, docs, &docs.manifest);
                }
                results.push(res);
            }
        }
        outcome(ctx, &results)
    })
}

pub fn execute_config(data: &[u8]) -> Outcome {
    // As many layers as the config claims, so that consistent configs get
    // past the diff_ids check.
    let layers = serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v.pointer("/rootfs/diff_ids")?.as_array().map(Vec::len))
        .unwrap_or(1)
        .min(MAX_LAYERS);
    with_ctx(|ctx| {
        ctx.clear();
        let (cd, csize) = ctx.put_blob(data);
        let manifest = manifest_json((&cd, csize), layers);
        let (md, msize) = ctx.put_blob(&manifest);
        ctx.put_index_json(&index_json(&[(
            MEDIA_TYPE_OCI_MANIFEST,
            &md,
            msize,
            "latest",
        )]));
        let res = ctx.resolve(REF_LATEST);
        if let Ok(image) = &res {
            assert_eq!(image.config_digest, cd);
            assert_eq!(image.manifest_digest, md);
            assert_eq!(image.layers.len(), layers);
            let c = &image.config;
            assert!(
                c.env.iter().all(|(k, _)| !k.contains('=')),
                "an env key contains '=': {:?}",
                c.env
            );
            assert!(c.exposed_ports.is_sorted(), "exposed ports are not sorted");
            assert!(c.working_dir.as_ref().is_none_or(|w| !w.is_empty()));
            assert!(c.user.as_ref().is_none_or(|u| !u.is_empty()));
            assert_eq!(
                c.default_argv().len(),
                c.entrypoint.len() + c.cmd.len(),
                "default argv is entrypoint + cmd"
            );
            if let Some((k, v)) = c.env.last() {
                assert_eq!(
                    c.env_var(k),
                    Some(v.as_str()),
                    "the last value of a key wins"
                );
            }
        }
        outcome(ctx, &[res])
    })
}

/// `manifest` seeds: one per mode, each resolving.
pub fn manifest_seeds() -> Vec<Vec<u8>> {
    let docs = docs();
    let md = Digest::of(&docs.manifest);
    let nd = Digest::of(&docs.nested);
    let index = index_json(&[
        (
            MEDIA_TYPE_OCI_MANIFEST,
            &md,
            docs.manifest.len() as u64,
            "latest",
        ),
        (MEDIA_TYPE_OCI_INDEX, &nd, docs.nested.len() as u64, "v2"),
    ]);
    let with_mode = |mode: u8, body: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(body);
        v
    };
    vec![
        with_mode(0, &docs.manifest),
        with_mode(1, &index),
        with_mode(2, &docs.nested),
    ]
}

/// `image_config` seeds: the full config, a minimal one, a Docker-style one.
pub fn config_seeds() -> Vec<Vec<u8>> {
    let zero = format!("sha256:{}", "0".repeat(64));
    vec![
        config_json(),
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [zero, zero]}
        }))
        .expect("JSON"),
        br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","EMPTY"],"Cmd":["sh"],"WorkingDir":"","User":"","ExposedPorts":null,"Labels":null},"rootfs":{"type":"layers","diff_ids":[]},"container_config":{"Hostname":"x"}}"#.to_vec(),
    ]
}
