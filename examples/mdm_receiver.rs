//! A receiver for vppd's install webhook that hands each command to an MDM:
//! a starting point for an integration (docs/mdm-integration.md explains
//! every step).
//!
//! It
//! 1. verifies `X-Vppd-Signature: sha256=<hex HMAC-SHA256 over
//!    "<timestamp>.<raw body>">` with the shared `[install]
//!    signing_secret_file`, and refuses a timestamp more than `--max-skew`
//!    away from now (a replay);
//! 2. drops a `commandUuid` it has handed on before (vppd delivers at least
//!    once), remembering them in `--seen-file` across restarts;
//! 3. looks up the MDM enrollment of the target (`--enrollments`: serial
//!    number or clientUserId to enrollment id, e.g. the device's UDID);
//! 4. turns the command into Apple's MDM command (InstallApplication,
//!    RemoveApplication, InviteToProgram) and hands it to NanoMDM
//!    (`PUT /v1/enqueue/{id}`, the command plist), MicroMDM
//!    (`POST /v1/commands`, JSON) or a queue directory (one plist file per
//!    command, for an MDM that consumes a queue);
//! 5. answers 200 only once every command of the POST was handed on, so
//!    vppd retries the whole batch otherwise (repeats are dropped in step 2).
//!
//! ```sh
//! cargo run --example mdm_receiver -- --listen 127.0.0.1:8000 \
//!     --signing-secret-file /etc/vppd/webhook-signing-secret \
//!     --enrollments enrollments.csv --catalog catalog.csv \
//!     --seen-file /var/lib/mdm-receiver/seen \
//!     --nanomdm http://127.0.0.1:9000 --api-key-file /etc/nanomdm/api-key
//! ```

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::Sha256;
use vppd::runtime::http::{self, Body, Server};

/// The program ID Apple defines for InviteToProgram (Apps and Books).
const PROGRAM_ID: &str = "com.apple.cloudvpp";

// ---------------------------------------------------------------- signature

/// Verifies the contract's signature: `X-Vppd-Timestamp: <unix seconds>`,
/// `X-Vppd-Signature: sha256=<hex HMAC-SHA256 over "<timestamp>.<raw body>">`.
pub struct Verifier {
    secret: Vec<u8>,
    max_skew: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    MissingHeaders,
    BadTimestamp,
    Stale { skew_secs: u64 },
    BadSignature,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::MissingHeaders => {
                write!(f, "X-Vppd-Timestamp and X-Vppd-Signature are required")
            }
            Refusal::BadTimestamp => write!(f, "X-Vppd-Timestamp is not unix seconds"),
            Refusal::Stale { skew_secs } => {
                write!(
                    f,
                    "X-Vppd-Timestamp is {skew_secs} s away from now (replay?)"
                )
            }
            Refusal::BadSignature => write!(f, "X-Vppd-Signature does not match"),
        }
    }
}

impl Verifier {
    /// The secret file's content with surrounding whitespace ignored, as
    /// vppd reads it.
    pub fn new(secret_file_content: &str, max_skew: Duration) -> Verifier {
        Verifier {
            secret: secret_file_content.trim().as_bytes().to_vec(),
            max_skew,
        }
    }

    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now_secs: u64,
    ) -> Result<(), Refusal> {
        let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
            return Err(Refusal::MissingHeaders);
        };
        let sent: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| Refusal::BadTimestamp)?;
        let skew_secs = now_secs.abs_diff(sent);
        if skew_secs > self.max_skew.as_secs() {
            return Err(Refusal::Stale { skew_secs });
        }
        let hex_part = signature
            .trim()
            .strip_prefix("sha256=")
            .ok_or(Refusal::BadSignature)?;
        let given = hex::decode(hex_part).map_err(|_| Refusal::BadSignature)?;
        let mut mac = self.mac();
        mac.update(timestamp.trim().as_bytes());
        mac.update(b".");
        mac.update(body);
        // Constant time: a timing difference must not reveal the signature.
        mac.verify_slice(&given).map_err(|_| Refusal::BadSignature)
    }

    /// What vppd sends for `body` at `timestamp`; for tests and tools.
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length; this cannot fail.
        match Hmac::<Sha256>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        }
    }
}

// ----------------------------------------------------------------- commands

/// One command as vppd posts it (`{"commands": [...]}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VppdCommand {
    pub command_uuid: String,
    /// Absent from daemons that only release installs.
    #[serde(default)]
    pub request_type: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub adam_id: Option<String>,
    #[serde(default)]
    pub pricing_param: Option<String>,
    #[serde(default)]
    pub serial_number: Option<String>,
    #[serde(default)]
    pub client_user_id: Option<String>,
    #[serde(default)]
    pub invitation_url: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct VppdBatch {
    pub commands: Vec<VppdCommand>,
}

impl VppdCommand {
    /// The serial number or clientUserId the command is for.
    pub fn target(&self) -> Option<&str> {
        self.serial_number
            .as_deref()
            .or(self.client_user_id.as_deref())
    }
}

/// Apple's MDM command for a vppd command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MdmCommand {
    InstallApplication { itunes_store_id: u64 },
    RemoveApplication { identifier: String },
    InviteToProgram { invitation_url: String },
}

/// Maps a vppd command to Apple's; `Err` says why it cannot be.
/// RemoveApplication needs the app's bundle identifier, which vppd does not
/// know: `catalog` maps adamId to it.
pub fn to_mdm(c: &VppdCommand, catalog: &HashMap<String, String>) -> Result<MdmCommand, String> {
    let adam_id = || {
        c.adam_id
            .as_deref()
            .ok_or_else(|| format!("{}: no adamId", c.command_uuid))
    };
    match c.request_type.as_deref().unwrap_or("InstallApplication") {
        "InstallApplication" => {
            let id = adam_id()?;
            let itunes_store_id = id
                .parse()
                .map_err(|_| format!("{}: adamId {id} is not a number", c.command_uuid))?;
            Ok(MdmCommand::InstallApplication { itunes_store_id })
        }
        "RemoveApplication" => {
            let id = adam_id()?;
            let identifier = catalog.get(id).cloned().ok_or_else(|| {
                format!(
                    "{}: adamId {id} is not in the catalog (adamId,bundleId)",
                    c.command_uuid
                )
            })?;
            Ok(MdmCommand::RemoveApplication { identifier })
        }
        "InviteToProgram" => {
            let invitation_url = c
                .invitation_url
                .clone()
                .ok_or_else(|| format!("{}: no invitationUrl", c.command_uuid))?;
            Ok(MdmCommand::InviteToProgram { invitation_url })
        }
        other => Err(format!("{}: unknown requestType {other}", c.command_uuid)),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The command plist as NanoMDM enqueues it and the device receives it.
/// The vppd commandUuid is the MDM CommandUUID, so the device's answer can be
/// matched to the assignment.
pub fn plist(command_uuid: &str, command: &MdmCommand) -> String {
    let body = match command {
        MdmCommand::InstallApplication { itunes_store_id } => format!(
            "\t\t<key>RequestType</key>\n\t\t<string>InstallApplication</string>\n\
             \t\t<key>iTunesStoreID</key>\n\t\t<integer>{itunes_store_id}</integer>\n\
             \t\t<key>ManagementFlags</key>\n\t\t<integer>1</integer>\n\
             \t\t<key>Options</key>\n\t\t<dict>\n\
             \t\t\t<key>PurchaseMethod</key>\n\t\t\t<integer>1</integer>\n\
             \t\t</dict>\n"
        ),
        MdmCommand::RemoveApplication { identifier } => format!(
            "\t\t<key>RequestType</key>\n\t\t<string>RemoveApplication</string>\n\
             \t\t<key>Identifier</key>\n\t\t<string>{}</string>\n",
            xml_escape(identifier)
        ),
        MdmCommand::InviteToProgram { invitation_url } => format!(
            "\t\t<key>RequestType</key>\n\t\t<string>InviteToProgram</string>\n\
             \t\t<key>ProgramID</key>\n\t\t<string>{PROGRAM_ID}</string>\n\
             \t\t<key>InvitationURL</key>\n\t\t<string>{}</string>\n",
            xml_escape(invitation_url)
        ),
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\
         \t<key>Command</key>\n\t<dict>\n{body}\t</dict>\n\
         \t<key>CommandUUID</key>\n\t<string>{}</string>\n\
         </dict>\n</plist>\n",
        xml_escape(command_uuid)
    )
}

/// MicroMDM's `POST /v1/commands` body. MicroMDM picks its own CommandUUID,
/// so dropping repeats is this receiver's job (the seen file).
pub fn micromdm_json(udid: &str, command: &MdmCommand) -> serde_json::Value {
    match command {
        MdmCommand::InstallApplication { itunes_store_id } => serde_json::json!({
            "udid": udid,
            "request_type": "InstallApplication",
            "itunes_store_id": itunes_store_id,
            "management_flags": 1,
            "options": {"purchase_method": 1},
        }),
        MdmCommand::RemoveApplication { identifier } => serde_json::json!({
            "udid": udid,
            "request_type": "RemoveApplication",
            "identifier": identifier,
        }),
        MdmCommand::InviteToProgram { invitation_url } => serde_json::json!({
            "udid": udid,
            "request_type": "InviteToProgram",
            "program_id": PROGRAM_ID,
            "invitation_url": invitation_url,
        }),
    }
}

// ---------------------------------------------------------------- the MDMs

/// Where commands go.
pub enum Destination {
    /// NanoMDM: `PUT {url}/v1/enqueue/{enrollment id}` with the plist,
    /// HTTP Basic user "nanomdm" and the API key.
    NanoMdm {
        url: String,
        api_key: String,
        http: reqwest::Client,
    },
    /// MicroMDM: `POST {url}/v1/commands` with JSON, HTTP Basic user
    /// "micromdm" and the API key.
    MicroMdm {
        url: String,
        api_key: String,
        http: reqwest::Client,
    },
    /// A queue an MDM worker consumes: `{dir}/{enrollment id}/{commandUuid}.plist`,
    /// written atomically (temporary file, then rename).
    Queue { dir: PathBuf },
}

impl Destination {
    pub async fn enqueue(
        &self,
        enrollment: &str,
        uuid: &str,
        command: &MdmCommand,
    ) -> Result<(), String> {
        match self {
            Destination::NanoMdm { url, api_key, http } => {
                let endpoint = format!("{}/v1/enqueue/{}", url.trim_end_matches('/'), enrollment);
                let resp = http
                    .put(&endpoint)
                    .basic_auth("nanomdm", Some(api_key))
                    .header("Content-Type", "application/xml")
                    .body(plist(uuid, command))
                    .send()
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                // 207: the command was stored but a push failed; the device
                // still gets it at its next check-in.
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("{endpoint} answered {}", resp.status()))
                }
            }
            Destination::MicroMdm { url, api_key, http } => {
                let endpoint = format!("{}/v1/commands", url.trim_end_matches('/'));
                let resp = http
                    .post(&endpoint)
                    .basic_auth("micromdm", Some(api_key))
                    .json(&micromdm_json(enrollment, command))
                    .send()
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("{endpoint} answered {}", resp.status()))
                }
            }
            Destination::Queue { dir } => {
                let folder = dir.join(enrollment);
                let file = folder.join(format!("{uuid}.plist"));
                let temp = folder.join(format!(".{uuid}.tmp"));
                let write = || -> std::io::Result<()> {
                    std::fs::create_dir_all(&folder)?;
                    let mut f = std::fs::File::create(&temp)?;
                    f.write_all(plist(uuid, command).as_bytes())?;
                    f.sync_all()?;
                    std::fs::rename(&temp, &file)
                };
                write().map_err(|e| format!("{}: {e}", file.display()))
            }
        }
    }
}

// ------------------------------------------------------------ the receiver

/// commandUuids handed on, kept in an append-only file (one per line) so
/// that a repeat after a restart is still dropped.
pub struct Seen {
    set: HashSet<String>,
    file: Option<std::fs::File>,
}

impl Seen {
    pub fn open(path: Option<&Path>) -> std::io::Result<Seen> {
        let Some(path) = path else {
            return Ok(Seen {
                set: HashSet::new(),
                file: None,
            });
        };
        let set = match std::fs::read_to_string(path) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Seen {
            set,
            file: Some(file),
        })
    }

    pub fn contains(&self, uuid: &str) -> bool {
        self.set.contains(uuid)
    }

    fn insert(&mut self, uuid: &str) -> std::io::Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{uuid}")?;
            f.sync_data()?;
        }
        self.set.insert(uuid.to_string());
        Ok(())
    }
}

pub struct Receiver {
    /// `None` only with `--allow-unsigned`, for a daemon without
    /// `signing_secret_file` on a trusted network.
    pub verifier: Option<Verifier>,
    /// Serial number or clientUserId → MDM enrollment id.
    pub enrollments: HashMap<String, String>,
    /// adamId → bundle identifier, for RemoveApplication.
    pub catalog: HashMap<String, String>,
    pub mdm: Destination,
    /// One batch at a time: the seen set and the MDM see commands in order.
    pub seen: tokio::sync::Mutex<Seen>,
}

/// What one POST did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub enqueued: usize,
    pub repeats: usize,
    /// Commands that cannot be handed on (unknown target, no bundle id):
    /// logged for a person, and acknowledged, since retrying cannot help.
    pub skipped: usize,
}

impl Receiver {
    pub async fn take(&self, batch: VppdBatch) -> Result<Outcome, String> {
        let mut seen = self.seen.lock().await;
        let mut outcome = Outcome::default();
        for c in batch.commands {
            if seen.contains(&c.command_uuid) {
                outcome.repeats += 1;
                continue;
            }
            let target = c.target().unwrap_or("");
            let routed = match self.enrollments.get(target) {
                Some(enrollment) => to_mdm(&c, &self.catalog).map(|m| (enrollment, m)),
                None => Err(format!(
                    "{}: no enrollment for target `{target}`",
                    c.command_uuid
                )),
            };
            match routed {
                Ok((enrollment, command)) => {
                    self.mdm
                        .enqueue(enrollment, &c.command_uuid, &command)
                        .await?;
                    outcome.enqueued += 1;
                }
                Err(why) => {
                    eprintln!("mdm_receiver: skipped {why}");
                    outcome.skipped += 1;
                }
            }
            seen.insert(&c.command_uuid)
                .map_err(|e| format!("seen file: {e}"))?;
        }
        Ok(outcome)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn answer(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    http::json(status, &value)
}

impl http::Handler for Receiver {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::POST {
            return answer(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "POST only"}),
            );
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (timestamp, signature) = (header("x-vppd-timestamp"), header("x-vppd-signature"));
        // The signature covers the raw bytes: verify before parsing.
        let body = match http::read_body(req.into_body(), 64 << 20).await {
            Ok(b) => b,
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": e.to_string()}),
                );
            }
        };
        if let Some(v) = &self.verifier
            && let Err(refusal) = v.verify(
                timestamp.as_deref(),
                signature.as_deref(),
                &body,
                now_secs(),
            )
        {
            eprintln!("mdm_receiver: refused a POST: {refusal}");
            return answer(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": refusal.to_string()}),
            );
        }
        let batch: VppdBatch = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": format!("not a command batch: {e}")}),
                );
            }
        };
        match self.take(batch).await {
            Ok(outcome) => answer(StatusCode::OK, serde_json::json!(outcome)),
            // Not handed on: vppd retries the batch, and what was handed on
            // before the failure is then dropped as a repeat.
            Err(e) => {
                eprintln!("mdm_receiver: {e}");
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": e}),
                )
            }
        }
    }
}

/// `key,value` lines; `#` starts a comment.
pub fn read_pairs(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(',')
            .ok_or_else(|| format!("{}:{}: expected key,value", path.display(), n + 1))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

// ------------------------------------------------------------------- main

#[derive(clap::Parser, Debug)]
#[command(about = "Receives vppd's install webhook and hands the commands to an MDM")]
struct Args {
    /// Address to serve the webhook on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// The same file as vppd's `[install] signing_secret_file`.
    #[arg(long, value_name = "FILE", required_unless_present = "allow_unsigned")]
    signing_secret_file: Option<PathBuf>,
    /// Largest accepted distance between X-Vppd-Timestamp and now, in seconds.
    #[arg(long, default_value_t = 300)]
    max_skew: u64,
    /// Take unsigned POSTs (a daemon without signing_secret_file).
    #[arg(long)]
    allow_unsigned: bool,
    /// CSV of `serialNumber or clientUserId,enrollment id`.
    #[arg(long, value_name = "FILE")]
    enrollments: PathBuf,
    /// CSV of `adamId,bundle identifier`, needed for RemoveApplication.
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Remembers handed-on commandUuids across restarts.
    #[arg(long, value_name = "FILE")]
    seen_file: Option<PathBuf>,
    /// NanoMDM's base URL.
    #[arg(long, value_name = "URL", group = "mdm")]
    nanomdm: Option<String>,
    /// MicroMDM's base URL.
    #[arg(long, value_name = "URL", group = "mdm")]
    micromdm: Option<String>,
    /// A directory queue: one plist per command.
    #[arg(long, value_name = "DIR", group = "mdm")]
    queue_dir: Option<PathBuf>,
    /// The NanoMDM or MicroMDM API key.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
}

fn build(args: &Args) -> Result<Receiver, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let verifier = match &args.signing_secret_file {
        Some(p) => Some(Verifier::new(&read(p)?, Duration::from_secs(args.max_skew))),
        None => None,
    };
    let api_key = || -> Result<String, String> {
        let p = args
            .api_key_file
            .as_deref()
            .ok_or("--api-key-file is required for NanoMDM and MicroMDM")?;
        Ok(read(p)?.trim().to_string())
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let mdm = match (&args.nanomdm, &args.micromdm, &args.queue_dir) {
        (Some(url), None, None) => Destination::NanoMdm {
            url: url.clone(),
            api_key: api_key()?,
            http,
        },
        (None, Some(url), None) => Destination::MicroMdm {
            url: url.clone(),
            api_key: api_key()?,
            http,
        },
        (None, None, Some(dir)) => Destination::Queue { dir: dir.clone() },
        _ => return Err("give exactly one of --nanomdm, --micromdm, --queue-dir".into()),
    };
    Ok(Receiver {
        verifier,
        enrollments: read_pairs(&args.enrollments)?,
        catalog: match &args.catalog {
            Some(p) => read_pairs(p)?,
            None => HashMap::new(),
        },
        mdm,
        seen: tokio::sync::Mutex::new(
            Seen::open(args.seen_file.as_deref()).map_err(|e| format!("seen file: {e}"))?,
        ),
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = <Args as clap::Parser>::parse();
    let receiver = match build(&args) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("mdm_receiver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(&args.listen, receiver).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mdm_receiver: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("mdm_receiver: listening on http://{}", server.local_addr());
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown().await;
    std::process::ExitCode::SUCCESS
}
