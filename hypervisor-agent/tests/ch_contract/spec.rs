//! Cloud Hypervisor's OpenAPI spec, read from its YAML at test time: the
//! operations it declares and JSON-schema validators built from its
//! component schemas (with `$ref`s resolved by the validator).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Value, json};

/// Where the spec is: `SOMNA_CH_OPENAPI`, else the copy of Cloud
/// Hypervisor's published OpenAPI spec (Apache-2.0, LICENSE beside it)
/// kept with these tests.
pub fn spec_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SOMNA_CH_OPENAPI") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/ch_contract/spec/cloud-hypervisor-openapi.yaml")
}

pub struct Spec {
    doc: Value,
    validators: HashMap<String, jsonschema::Validator>,
}

/// Bodies must not carry fields the spec does not declare: every object
/// schema with `properties` and no `additionalProperties` gets
/// `additionalProperties: false`, so a misspelt field is a violation
/// (Cloud Hypervisor itself rejects unknown fields in most configs).
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, child) in map.iter_mut() {
                close_objects(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// What the published spec leaves out but the VMM reads, declared here so
/// that the driver may send it and nothing else:
/// - `RestoreConfig.net_fds` (Cloud Hypervisor's `vmm/src/config.rs`
///   `RestoreConfig` and `RestoredNetConfig`, documented in its
///   `docs/snapshot_restore.md`): the network devices that get new TAP
///   descriptors, sent with the request;
/// - `NetConfig.fds` (`vmm/src/vm_config.rs`): how a snapshot's
///   `config.json` marks a device backed by descriptors (read back as -1s).
fn declare_undocumented(schemas: &mut Value) {
    let net = &mut schemas["NetConfig"]["properties"];
    if net.get("fds").is_none() {
        net["fds"] = json!({ "type": "array", "items": { "type": "integer" } });
    }
    let restore = &mut schemas["RestoreConfig"]["properties"];
    if restore.get("net_fds").is_none() {
        restore["net_fds"] = json!({
            "type": "array",
            "items": { "$ref": "#/components/schemas/RestoredNetConfig" },
        });
    }
    if schemas.get("RestoredNetConfig").is_none() {
        schemas["RestoredNetConfig"] = json!({
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": { "type": "string" },
                "num_fds": { "type": "integer" },
            },
        });
    }
}

impl Spec {
    pub fn load() -> Spec {
        let path = spec_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the Cloud Hypervisor OpenAPI spec {}: {e} (set SOMNA_CH_OPENAPI)",
                path.display()
            )
        });
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        // YAML keys such as response codes (`204:`) are numbers; JSON
        // needs strings, which serde_json's conversion does not do, so go
        // through a re-keying walk.
        let doc = yaml_to_json(yaml);
        let mut schemas = doc["components"]["schemas"].clone();
        assert!(schemas.is_object(), "the spec has no components/schemas");
        declare_undocumented(&mut schemas);
        close_objects(&mut schemas);
        let mut validators = HashMap::new();
        for name in schemas.as_object().unwrap().keys() {
            let root = json!({
                "$ref": format!("#/components/schemas/{name}"),
                "components": { "schemas": schemas },
            });
            let v = jsonschema::options()
                .build(&root)
                .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
            validators.insert(name.clone(), v);
        }
        Spec { doc, validators }
    }

    /// The operation for `method` on `path` (`/vm.boot`): Err(404) for an
    /// unknown path, Err(405) for a method the path does not have.
    pub fn operation(&self, path: &str, method: &str) -> Result<&Value, u16> {
        let item = self.doc["paths"].get(path).ok_or(404u16)?;
        item.get(method.to_ascii_lowercase()).ok_or(405)
    }

    /// The component schema name of an operation's JSON request body.
    pub fn request_schema(op: &Value) -> Option<String> {
        ref_name(&op["requestBody"]["content"]["application/json"]["schema"])
    }

    /// The component schema name of an operation's JSON answer for `status`.
    pub fn response_schema(op: &Value, status: u16) -> Option<String> {
        ref_name(&op["responses"][status.to_string()]["content"]["application/json"]["schema"])
    }

    /// Whether the operation declares this answer status.
    pub fn declares(op: &Value, status: u16) -> bool {
        op["responses"].get(status.to_string()).is_some()
    }

    /// Errors of `body` against component schema `name`, one line each.
    pub fn check(&self, name: &str, body: &Value) -> Vec<String> {
        let v = self
            .validators
            .get(name)
            .unwrap_or_else(|| panic!("the spec has no schema {name}"));
        v.iter_errors(body)
            .map(|e| format!("{name}{}: {e}", e.instance_path()))
            .collect()
    }

    /// The enum values of a string schema (to check the spec still lacks
    /// what the driver probes for).
    pub fn enum_values(&self, name: &str) -> Vec<String> {
        self.doc["components"]["schemas"][name]["enum"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn ref_name(schema: &Value) -> Option<String> {
    schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .map(String::from)
}

fn yaml_to_json(v: serde_yaml::Value) -> Value {
    use serde_yaml::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                json!(i)
            } else if let Some(u) = n.as_u64() {
                json!(u)
            } else {
                json!(n.as_f64().unwrap_or(0.0))
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        Y::Number(n) => n.to_string(),
                        Y::Bool(b) => b.to_string(),
                        other => serde_yaml::to_string(&other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => yaml_to_json(t.value),
    }
}
