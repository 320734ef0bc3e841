//! Keeps the operator-facing files in step with the code: docs/openapi.json
//! against the job API's types, and deploy/vppd.toml against the config
//! parser. A field added to `JobStatus` or `JobRequest` without the spec, or
//! a config key renamed without the example, fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use vppd::domain::job::{
    Failure, InstallCounts, JobRequest, JobState, JobStatus, PairCounts, Phase, RequestCounts,
    UserCounts,
};
use vppd::runtime::config::{Config, LogFormat};
use vppd::stages::release::{CommandBatch, InstallCommand};

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn spec() -> Value {
    let path = repo_file("docs/openapi.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Follows `$ref`s (local ones only, which is all the spec uses).
fn resolve<'a>(spec: &'a Value, mut schema: &'a Value) -> &'a Value {
    while let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        schema = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} points nowhere"));
    }
    schema
}

fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("components.schemas.{name} is missing"))
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn required_names(schema: &Value) -> BTreeSet<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Checks an object's keys against a schema (resolving `$ref`s), and each
/// nested object value against its property's schema.
fn assert_matches_schema(spec: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(spec, schema);
    assert_eq!(
        keys(value),
        property_names(schema),
        "{at}: the serialized keys differ from the schema's properties"
    );
    for (key, item) in value.as_object().into_iter().flatten() {
        let Some(property) = schema.pointer(&format!("/properties/{key}")) else {
            continue;
        };
        let property = resolve(spec, property);
        if item.is_object() {
            assert_matches_schema(spec, property, item, &format!("{at}.{key}"));
        }
    }
}

// ---------------------------------------------------------------- paths

#[test]
fn every_operation_exists_with_its_status_codes() {
    let spec = spec();
    assert_eq!(
        spec["openapi"].as_str().map(|v| v.starts_with("3.1")),
        Some(true)
    );
    let table: &[(&str, &str, &[&str])] = &[
        (
            "/v1/jobs",
            "post",
            &["200", "202", "400", "401", "409", "413", "415", "503"],
        ),
        ("/v1/jobs", "get", &["200", "401", "503"]),
        ("/v1/jobs/{id}", "get", &["200", "401", "404", "503"]),
        ("/v1/jobs/{id}", "delete", &["200", "401", "404", "503"]),
        (
            "/v1/jobs/{id}/failures",
            "get",
            &["200", "401", "404", "503"],
        ),
        ("/v1/tokens", "get", &["200", "401"]),
        ("/v1/tokens/{name}", "get", &["200", "401", "404"]),
        (
            "/v1/tokens/{name}",
            "put",
            &["200", "201", "400", "401", "409", "413", "415", "503"],
        ),
        (
            "/v1/tokens/{name}",
            "delete",
            &["200", "401", "404", "409", "503"],
        ),
        (
            "/v1/tokens/{name}/assets",
            "get",
            &["200", "401", "404", "503"],
        ),
        (
            "/v1/tokens/{name}/users",
            "get",
            &["200", "400", "401", "404", "503"],
        ),
        (
            "/v1/tokens/{name}/drift",
            "get",
            &["200", "401", "404", "503"],
        ),
        (
            "/v1/tokens/{name}/rotate-secret",
            "post",
            &["200", "401", "404", "503"],
        ),
        ("/metrics", "get", &["200"]),
        ("/healthz", "get", &["200"]),
        ("/readyz", "get", &["200", "503"]),
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if method != "parameters" {
                documented.insert((path.clone(), method.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = table
        .iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(documented, expected, "operations in docs/openapi.json");

    for (path, method, codes) in table {
        let op = &spec["paths"][path][method];
        let responses: BTreeSet<String> = keys(&op["responses"]);
        assert_eq!(responses, names(codes), "{method} {path}: response codes");
        for code in *codes {
            let content = &op["responses"][code]["content"];
            if path.starts_with("/v1") {
                assert!(
                    content.get("application/json").is_some(),
                    "{method} {path} {code}: answers JSON"
                );
            }
            if path.starts_with("/v1") && (code.starts_with('4') || *code == "503") {
                let schema = &content["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{method} {path} {code}: error answers use the Error schema"
                );
            }
        }
        // Bearer auth on the job API only: /metrics, /healthz and /readyz
        // never need the admin token.
        let security = op
            .get("security")
            .unwrap_or_else(|| panic!("{method} {path}: no security"));
        if path.starts_with("/v1") {
            assert_eq!(security, &json!([{"bearerAuth": []}]), "{method} {path}");
        } else {
            assert_eq!(security, &json!([]), "{method} {path}");
        }
    }
    assert!(
        spec.get("security").is_none(),
        "no global security requirement"
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    assert_eq!(
        spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/JobRequest"
    );
    assert_eq!(property_names(schema(&spec, "Error")), names(&["error"]));
}

// ---------------------------------------------------------------- status document

fn failure(serial: Option<&str>, user: Option<&str>, phase: Option<Phase>) -> Failure {
    Failure {
        adam_id: "361309726".into(),
        pricing_param: "STDQ".into(),
        serial_number: serial.map(String::from),
        client_user_id: user.map(String::from),
        error_number: 9709,
        error_message: "There are not enough licenses".into(),
        event_id: Some("92467a8e-4a0c-4b8f-9a57-0c6b8f1e2d3a".into()),
        phase,
    }
}

fn full_status() -> JobStatus {
    JobStatus {
        id: "back-to-school-2026".into(),
        token: "main".into(),
        state: JobState::Failed,
        error: Some("token main: refused by Apple".into()),
        requests: RequestCounts {
            planned: 10,
            submitted: 4,
            completed: 3,
        },
        assignments: PairCounts {
            total: 250,
            confirmed: 75,
            failed: 1,
            pending: 174,
        },
        disassociations: PairCounts {
            total: 2,
            confirmed: 2,
            failed: 0,
            pending: 0,
        },
        installs: InstallCounts {
            released: 74,
            pending: 1,
        },
        revocations: PairCounts {
            total: 4,
            confirmed: 4,
            failed: 0,
            pending: 0,
        },
        removals: InstallCounts {
            released: 5,
            pending: 1,
        },
        users: UserCounts {
            total: 3,
            associated: 2,
            invited: 1,
        },
        waiting_for: Some(
            "license shortfall: asset 361309726 (STDQ): 12 needed, 10 available".into(),
        ),
        failures: Some(vec![
            failure(Some("X1"), None, Some(Phase::Associate)),
            failure(None, Some("client-100"), Some(Phase::Disassociate)),
        ]),
        failures_truncated: Some(true),
        created_at: "2026-08-20T07:00:00Z".into(),
        finished_at: Some("2026-08-20T07:05:00Z".into()),
    }
}

#[test]
fn status_schema_matches_the_serialized_job_status() {
    let spec = spec();
    let status_schema = schema(&spec, "JobStatus");
    let full = serde_json::to_value(full_status()).unwrap();
    // Top level and every nested object (requests, assignments, ...).
    let mut without_failures = full.clone();
    without_failures.as_object_mut().unwrap().remove("failures");
    let mut props = status_schema.clone();
    props["properties"]
        .as_object_mut()
        .unwrap()
        .remove("failures");
    assert_matches_schema(&spec, &props, &without_failures, "JobStatus");
    assert!(property_names(status_schema).contains("failures"));

    // Failures: the union over a device failure and a user failure is the
    // schema, and each has exactly one of serialNumber / clientUserId.
    let failure_schema = resolve(&spec, &status_schema["properties"]["failures"]["items"]);
    assert_eq!(failure_schema, schema(&spec, "Failure"));
    let mut union = BTreeSet::new();
    for f in full["failures"].as_array().unwrap() {
        let k = keys(f);
        assert!(
            k.contains("serialNumber") != k.contains("clientUserId"),
            "{f}"
        );
        union.extend(k);
    }
    assert_eq!(union, property_names(failure_schema), "Failure keys");

    // What is always serialized is exactly what the schema requires.
    let minimal = JobStatus {
        error: None,
        failures: None,
        failures_truncated: None,
        finished_at: None,
        waiting_for: None,
        ..full_status()
    };
    let minimal = serde_json::to_value(minimal).unwrap();
    assert_eq!(
        keys(&minimal),
        required_names(status_schema),
        "JobStatus required"
    );
    let bare_failure = serde_json::to_value(failure(Some("X1"), None, None)).unwrap();
    let mut always = keys(&bare_failure);
    always.remove("serialNumber");
    assert_eq!(always, required_names(failure_schema), "Failure required");

    // Nested required lists name every property (none is optional).
    for (name, counts) in [
        ("requests", &full["requests"]),
        ("assignments", &full["assignments"]),
        ("disassociations", &full["disassociations"]),
        ("installs", &full["installs"]),
        ("revocations", &full["revocations"]),
        ("removals", &full["removals"]),
    ] {
        let s = resolve(&spec, &status_schema["properties"][name]);
        assert_eq!(required_names(s), keys(counts), "{name} required");
    }

    // The state enum is JobState's.
    let states: Vec<&str> = resolve(&spec, &status_schema["properties"]["state"])["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ours: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(states, ours);

    // The phase enum is Phase's.
    let phases: Vec<&str> = failure_schema["properties"]["phase"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ours: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
    assert_eq!(phases, ours);
}

#[test]
fn status_and_failure_examples_deserialize() {
    let spec = spec();
    for example in schema(&spec, "JobStatus")["examples"]
        .as_array()
        .expect("JobStatus examples")
    {
        let status: JobStatus = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("JobStatus example does not deserialize: {e}\n{example}"));
        // Round trip: the example is exactly what the daemon would send.
        assert_eq!(&serde_json::to_value(&status).unwrap(), example);
    }
    for example in schema(&spec, "Failure")["examples"]
        .as_array()
        .expect("Failure examples")
    {
        let f: Failure = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("Failure example does not deserialize: {e}\n{example}"));
        assert_eq!(&serde_json::to_value(&f).unwrap(), example);
    }
}

// ---------------------------------------------------------------- job request

/// Every field `JobRequest` accepts (`partial` is serde's alias of
/// `allowPartial`).
const JOB_REQUEST_FIELDS: &[&str] = &[
    "id",
    "token",
    "assets",
    "disassociate",
    "associate",
    "revoke",
    "install",
    "uninstall",
    "waitForLicenses",
    "allowPartial",
    "partial",
    "users",
    "retireUsers",
    "priority",
];

fn validate(body: Value) -> Result<vppd::domain::job::JobSpec, String> {
    let request: JobRequest = serde_json::from_value(body).map_err(|e| e.to_string())?;
    let limits = vppd::domain::job::JobLimits {
        max_targets: 1000,
        ..vppd::domain::job::JobLimits::NONE
    };
    request.validate(|t| t == "main", limits).map_err(|e| e.0)
}

#[test]
fn request_schema_matches_what_job_request_accepts() {
    let spec = spec();
    let request_schema = schema(&spec, "JobRequest");
    assert_eq!(property_names(request_schema), names(JOB_REQUEST_FIELDS));
    assert_eq!(required_names(request_schema), names(&["token"]));
    assert_eq!(request_schema["additionalProperties"], false);
    assert_eq!(
        property_names(schema(&spec, "RequestAsset")),
        names(&["adamId", "pricingParam"])
    );
    assert_eq!(
        property_names(schema(&spec, "Targets")),
        names(&["serialNumbers", "clientUserIds"])
    );

    // One body with every property (partial aside: it is the alias) and
    // every nested property is accepted and validates.
    let every = json!({
        "id": "back-to-school-2026",
        "token": "main",
        "assets": [{"adamId": "361309726", "pricingParam": "PLUS"}],
        "disassociate": {"serialNumbers": ["OLD-1"], "clientUserIds": ["client-9"]},
        "associate": {"serialNumbers": ["C02Y402HLCM6"], "clientUserIds": ["client-100"]},
        "revoke": {"serialNumbers": ["GONE-1"], "clientUserIds": ["client-8"]},
        "install": false,
        "uninstall": true,
        "waitForLicenses": true,
        "allowPartial": true,
        "users": [{"clientUserId": "client-100", "email": "ana@example.com", "managedAppleId": "ana@appleschool.example.com"}],
        "retireUsers": ["client-7"],
        "priority": "high"
    });
    let mut used = keys(&every);
    used.insert("partial".into());
    assert_eq!(used, names(JOB_REQUEST_FIELDS));
    let job = validate(every.clone()).expect("every property");
    assert_eq!(job.id, "back-to-school-2026");
    assert!(!job.install);
    assert!(job.allow_partial);
    assert_eq!(job.assets[0].pricing_param, "PLUS");
    assert_eq!(job.disassociate.client_user_ids, ["client-9"]);
    assert_eq!(job.revoke.serial_numbers, ["GONE-1"]);
    assert!(job.uninstall && job.wait_for_licenses);
    assert_eq!(job.users[0].client_user_id, "client-100");
    assert_eq!(job.retire_users, ["client-7"]);
    assert_eq!(
        property_names(schema(&spec, "JobUser")),
        names(&["clientUserId", "email", "managedAppleId"])
    );
    assert_eq!(job.priority, vppd::domain::job::Priority::High);

    let mut with_alias = every.clone();
    let obj = with_alias.as_object_mut().unwrap();
    obj.remove("allowPartial");
    obj.insert("partial".into(), json!(true));
    assert!(validate(with_alias).expect("partial alias").allow_partial);

    // Defaults the schema states.
    let minimal = validate(json!({
        "token": "main",
        "assets": [{"adamId": 361309726u64}],
        "associate": {"serialNumbers": ["A"]}
    }))
    .expect("minimal");
    assert!(minimal.install, "install defaults to true");
    assert!(!minimal.allow_partial, "allowPartial defaults to false");
    assert_eq!(minimal.priority, vppd::domain::job::Priority::Normal);
    assert_eq!(
        request_schema["properties"]["priority"]["default"],
        "normal"
    );
    for bad in [json!("urgent"), json!(1), json!("HIGH")] {
        let e = validate(json!({
            "token": "main",
            "assets": [{"adamId": "1"}],
            "associate": {"serialNumbers": ["A"]},
            "priority": bad
        }))
        .expect_err("only high or normal");
        assert!(e.starts_with("priority"), "{e}");
    }
    assert_eq!(minimal.assets[0].pricing_param, "STDQ");
    assert_eq!(request_schema["properties"]["install"]["default"], true);
    assert_eq!(
        request_schema["properties"]["allowPartial"]["default"],
        false
    );
    assert_eq!(
        schema(&spec, "RequestAsset")["properties"]["pricingParam"]["default"],
        "STDQ"
    );

    // additionalProperties: false holds at every level.
    for (at, body) in [
        (
            "top",
            json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}, "urgency": 1}),
        ),
        (
            "asset",
            json!({"token": "main", "assets": [{"adamId": "1", "name": "x"}], "associate": {"serialNumbers": ["A"]}}),
        ),
        (
            "targets",
            json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serials": ["A"]}}),
        ),
    ] {
        assert!(
            validate(body).is_err(),
            "{at}: an unknown field must be refused"
        );
    }

    // The examples in the spec validate.
    for example in request_schema["examples"]
        .as_array()
        .expect("JobRequest examples")
    {
        validate(example.clone()).unwrap_or_else(|e| panic!("example refused: {e}\n{example}"));
    }
}

// ---------------------------------------------------------------- drift

#[test]
fn drift_schema_matches_the_drift_document() {
    use vppd::domain::lifecycle::{DriftChange, DriftItem, DriftRecord, drift_document};
    let spec = spec();
    let drift = schema(&spec, "Drift");
    assert_eq!(required_names(drift), property_names(drift));
    // Before vppd follows the token.
    let empty = drift_document(None);
    assert_matches_schema(&spec, drift, &empty, "Drift");
    assert!(empty["versionId"].is_null() && empty["checkedAt"].is_null());

    let item = |serial: Option<&str>, user: Option<&str>, job: Option<&str>| DriftItem {
        adam_id: "361309726".into(),
        pricing_param: "STDQ".into(),
        serial_number: serial.map(str::to_string),
        client_user_id: user.map(str::to_string),
        seen_ms: 1_700_000_000_000,
        job_id: job.map(str::to_string),
    };
    let mut record = DriftRecord::default();
    record.apply(DriftChange::Baseline {
        version_id: "v1".into(),
        foreign: Vec::new(),
        now: 1_700_000_000_000,
    });
    record.apply(DriftChange::Read {
        version_id: "v2".into(),
        unexplained: vec![item(None, Some("client-1"), None)],
        now: 1_700_000_000_000,
    });
    record.apply(DriftChange::Removed {
        items: vec![item(
            Some("C02Y402HLCM6"),
            None,
            Some("back-to-school-2026"),
        )],
    });
    let doc = drift_document(Some(&record));
    assert_matches_schema(&spec, drift, &doc, "Drift");
    assert_eq!(doc["versionId"], "v2");
    let item_schema = schema(&spec, "DriftItem");
    let every: BTreeSet<String> = keys(&doc["added"]["items"][0])
        .union(&keys(&doc["removed"]["items"][0]))
        .cloned()
        .collect();
    assert_eq!(every, property_names(item_schema));
    assert_eq!(doc["removed"]["items"][0]["jobId"], "back-to-school-2026");
    assert_eq!(doc["added"]["items"][0]["clientUserId"], "client-1");
    assert!(doc["added"]["items"][0].get("serialNumber").is_none());
}

// ---------------------------------------------------------------- webhook

#[test]
fn install_webhook_payload_matches_the_released_commands() {
    let spec = spec();
    let op = &spec["webhooks"]["installCommands"]["post"];
    let batch_schema = resolve(
        &spec,
        &op["requestBody"]["content"]["application/json"]["schema"],
    );
    let command_schema = resolve(&spec, &batch_schema["properties"]["commands"]["items"]);

    let batch = CommandBatch {
        commands: vec![InstallCommand {
            request_type: vppd::domain::job::RequestType::InstallApplication,
            invitation_url: None,
            command_uuid: "6f1c2b9e-3c55-5d2a-9a0e-7f7c1a1d2e3f".into(),
            job_id: "back-to-school-2026".into(),
            event_id: None,
            adam_id: "361309726".into(),
            pricing_param: "STDQ".into(),
            serial_number: Some("C02Y402HLCM6".into()),
            client_user_id: None,
        }],
    };
    let value = serde_json::to_value(&batch).unwrap();
    assert_eq!(keys(&value), property_names(batch_schema), "batch keys");
    let command = &value["commands"][0];
    // Every field is always sent, null when absent; `invitationUrl` only
    // on an invitation, which names no asset.
    let mut documented = property_names(command_schema);
    assert!(documented.remove("invitationUrl"));
    assert_eq!(keys(command), documented, "command keys");
    let mut always = keys(command);
    always.remove("adamId");
    always.remove("pricingParam");
    assert_eq!(always, required_names(command_schema), "command required");
    let invite = serde_json::to_value(InstallCommand {
        request_type: vppd::domain::job::RequestType::InviteToProgram,
        invitation_url: Some("https://apple.example/invite?inviteCode=abc".into()),
        command_uuid: "3d9b6f0e-1c2a-5e4b-9f8d-7a6c5b4e3d2f".into(),
        job_id: "j".into(),
        event_id: None,
        adam_id: String::new(),
        pricing_param: String::new(),
        serial_number: None,
        client_user_id: Some("client-101".into()),
    })
    .unwrap();
    let mut invite_keys = required_names(command_schema);
    invite_keys.insert("invitationUrl".into());
    assert_eq!(keys(&invite), invite_keys, "invitation keys");
    for nullable in ["eventId", "serialNumber", "clientUserId"] {
        assert_eq!(
            command_schema["properties"][nullable]["type"],
            json!(["string", "null"]),
            "{nullable} is nullable"
        );
    }
    for example in batch_schema["examples"]
        .as_array()
        .expect("webhook examples")
    {
        let parsed: CommandBatch = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("webhook example does not deserialize: {e}\n{example}"));
        assert_eq!(&serde_json::to_value(&parsed).unwrap(), example);
        for c in &parsed.commands {
            assert!(
                c.serial_number.is_some() != c.client_user_id.is_some(),
                "{c:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- example config

/// Every key `src/runtime/config.rs` reads, by table.
const CONFIG_KEYS: &[(&str, &[&str])] = &[
    ("", &["data_dir"]),
    (
        "apple",
        &[
            "base_url",
            "requests_per_second",
            "timeout",
            "mdm_id",
            "refresh_every",
            "max_events_in_flight",
        ],
    ),
    ("tokens", &["name", "stoken_file", "takeover"]),
    (
        "notifications",
        &[
            "listen",
            "public_url",
            "auth_token_file",
            "max_body_bytes",
            "max_connections",
            "idle_timeout",
            "header_read_timeout",
            "body_read_timeout",
        ],
    ),
    (
        "tracking",
        &[
            "status_poll_after",
            "status_poll_interval",
            "sync_after",
            "resubmit_after",
            "drift_every",
        ],
    ),
    (
        "admin",
        &[
            "listen",
            "token_file",
            "max_body_bytes",
            "max_job_targets",
            "max_job_assets",
            "max_job_pairs",
            "drain_timeout",
            "max_connections",
            "idle_timeout",
            "header_read_timeout",
            "body_read_timeout",
        ],
    ),
    (
        "install",
        &[
            "webhook_url",
            "auth_header",
            "batch_size",
            "signing_secret_file",
            "timeout",
        ],
    ),
    ("logging", &["format"]),
    ("store", &["kind", "retain_finished"]),
];

#[test]
fn example_config_is_valid_and_complete() {
    let path = repo_file("deploy/vppd.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("deploy/vppd.toml: {e}"));

    let text = std::fs::read_to_string(&path).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    for (section, expected) in CONFIG_KEYS {
        let present: BTreeSet<String> = match *section {
            "" => table
                .iter()
                .filter(|(_, v)| !v.is_table() && !v.is_array())
                .map(|(k, _)| k.clone())
                .collect(),
            "tokens" => keys_of(
                &table
                    .get("tokens")
                    .and_then(|t| t.as_array())
                    .expect("[[tokens]]")[0],
            ),
            s => keys_of(table.get(s).unwrap_or_else(|| panic!("[{s}] is missing"))),
        };
        assert_eq!(present, names(expected), "deploy/vppd.toml [{section}]");
    }

    // The values shown are the defaults the comments claim: compare with a
    // config that sets only the required keys.
    let required_only = Config::parse(
        r#"
data_dir = "/var/lib/vppd"
[apple]
base_url = "https://vpp.itunes.apple.com/mdm/v2"
[[tokens]]
name = "main"
stoken_file = "/run/credentials/vppd.service/main.vpptoken"
[notifications]
listen = "127.0.0.1:8088"
public_url = "https://mdm.example.com/vppd/notifications"
auth_token_file = "/var/lib/vppd/notification-auth-token"
[admin]
listen = "127.0.0.1:9180"
[install]
webhook_url = "http://127.0.0.1:8000/vpp-installs"
"#,
        Path::new("defaults.toml"),
    )
    .expect("required keys only");
    let d = &required_only;
    assert_eq!(config.data_dir, d.data_dir);
    assert_eq!(config.apple.base_url, d.apple.base_url);
    assert_eq!(
        config.apple.requests_per_second,
        d.apple.requests_per_second
    );
    assert_eq!(config.apple.timeout, d.apple.timeout);
    assert_eq!(config.apple.mdm_id, d.apple.mdm_id);
    assert_eq!(config.tokens.len(), 1);
    assert_eq!(config.tokens[0].takeover, d.tokens[0].takeover);
    assert_eq!(config.tokens[0].stoken_file, d.tokens[0].stoken_file);
    assert_eq!(
        config.notifications.max_body_bytes,
        d.notifications.max_body_bytes
    );
    assert_eq!(
        config.tracking.status_poll_after,
        d.tracking.status_poll_after
    );
    assert_eq!(
        config.tracking.status_poll_interval,
        d.tracking.status_poll_interval
    );
    assert_eq!(config.tracking.sync_after, d.tracking.sync_after);
    assert_eq!(config.tracking.drift_every, d.tracking.drift_every);
    assert_eq!(
        config.apple.max_events_in_flight,
        d.apple.max_events_in_flight
    );
    assert_eq!(d.apple.max_events_in_flight, 2);
    assert_eq!(d.tracking.drift_every, std::time::Duration::from_secs(900));
    assert_eq!(config.admin.token_file, d.admin.token_file);
    assert_eq!(config.admin.max_body_bytes, d.admin.max_body_bytes);
    assert_eq!(config.admin.max_job_targets, d.admin.max_job_targets);
    assert_eq!(config.admin.job_limits(), d.admin.job_limits());
    assert_eq!(config.admin.drain_timeout, d.admin.drain_timeout);
    assert_eq!(config.admin.connections, d.admin.connections);
    assert_eq!(
        config.notifications.connections,
        d.notifications.connections
    );
    assert_eq!(config.install.auth_header, d.install.auth_header);
    assert_eq!(config.install.batch_size, d.install.batch_size);
    assert_eq!(config.install.timeout, d.install.timeout);
    assert_eq!(config.logging.format, LogFormat::Plain);
    assert_eq!(config.store.kind, d.store.kind);
    assert_eq!(config.store.retain_finished, d.store.retain_finished);

    // The unit's stop timeout leaves room for the drain.
    let unit = std::fs::read_to_string(repo_file("deploy/vppd.service")).unwrap();
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec= in seconds");
    assert!(
        stop > config.admin.drain_timeout.as_secs(),
        "TimeoutStopSec must exceed drain_timeout"
    );
    assert!(unit.contains("ExecStart=/usr/bin/vppd run --config /etc/vppd/vppd.toml"));
    assert!(unit.contains("LoadCredential=main.vpptoken:/etc/vppd/main.vpptoken"));
}

fn keys_of(value: &toml::Value) -> BTreeSet<String> {
    value
        .as_table()
        .unwrap_or_else(|| panic!("not a table: {value}"))
        .keys()
        .cloned()
        .collect()
}
