//! The `vppd` binary: a thin layer over the library. Errors become a
//! message on stderr and a non-zero exit here, and nowhere else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{CommandFactory, Parser, Subcommand};

use vppd::runtime::config::{Config, LogFormat};

/// Assigns Apple app and book licenses at scale (App and Book Management
/// API v2) and releases an install command to the MDM for every assignment
/// Apple confirms, exactly once.
#[derive(Parser, Debug)]
#[command(name = "vppd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon until SIGTERM/SIGINT, then drain and exit 0.
    Run {
        /// The TOML config file (see deploy/vppd.toml).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Start even though the store holds less than its marker says it
        /// must (damaged, truncated, deleted or restored from an older
        /// backup): jobs and progress after that point are lost.
        #[arg(long)]
        accept_store_loss: bool,
    },
    /// Run one self-contained job on loopback: the Apple simulator, the
    /// daemon and a stand-in MDM in one process; exits non-zero if any
    /// assignment or install command is missing or duplicated.
    Demo(DemoArgs),
    /// Serve the Apple App and Book Management API v2 simulator.
    Sim(Box<vppd::sim::cli::SimArgs>),
    /// Post a job file to a running daemon; prints the job id.
    Submit {
        #[command(flatten)]
        admin: AdminArgs,
        /// The job, as JSON (see docs/openapi.json).
        file: PathBuf,
    },
    /// Show job progress (all jobs without JOB).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// A job id.
        job: Option<String>,
        /// Show a live progress bar until the job ends (drawn only on a
        /// terminal); keeps retrying while the daemon restarts.
        #[arg(long)]
        watch: bool,
    },
    /// Cancel what a job has not sent to Apple yet; what Apple already has
    /// is still tracked and its confirmed installs are still released.
    Cancel {
        #[command(flatten)]
        admin: AdminArgs,
        /// A job id.
        job: String,
    },
    /// List every failed pair of a job with Apple's error.
    Failures {
        #[command(flatten)]
        admin: AdminArgs,
        /// A job id.
        job: String,
        /// Print CSV (one header line, then one line per failed pair).
        #[arg(long)]
        csv: bool,
    },
    /// A stand-in MDM for trying vppd locally: receives install commands
    /// on POST (any path), acknowledges them, prints each new one and drops
    /// repeated commandUuids.
    Sink {
        /// Address to serve on, e.g. 127.0.0.1:8000 (port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Print no line per command, only the totals on exit.
        #[arg(long)]
        quiet: bool,
    },
    /// Add, renew, list and remove tokens of a running daemon.
    Token {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Validate a config file and the files it names.
    CheckConfig {
        /// The TOML config file (see deploy/vppd.toml).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Dry run: print the batches and request count of a job file, without
    /// calling Apple (Apple's sample limits unless overridden).
    Plan {
        /// The job, as JSON.
        job: PathBuf,
        /// Check the job's token and size against this config.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Apple's maxAssets: assets per request.
        #[arg(long, default_value_t = 25)]
        max_assets: u32,
        /// Apple's maxSerialNumbers: serial numbers per request.
        #[arg(long, default_value_t = 1000)]
        max_serial_numbers: u32,
        /// Apple's maxClientUserIds: client user ids per request.
        #[arg(long, default_value_t = 1000)]
        max_client_user_ids: u32,
    },
    /// Print shell completions.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

// The flags of `vppd demo`.
#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Devices (serial numbers) in the job [default: 10000, or 100 with
    /// --users].
    #[arg(long)]
    devices: Option<usize>,
    /// Apps assigned to every device.
    #[arg(long, default_value_t = 25)]
    apps: usize,
    /// Keep the store here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print no progress bar.
    #[arg(long)]
    quiet: bool,
    /// Then move the apps to as many other devices with uninstall (a
    /// second job); the summary counts the removals.
    #[arg(long)]
    reassign: bool,
    /// Drop this share (0 to 1) of Apple's notifications, to watch the
    /// event status and sync fallbacks finish the job.
    #[arg(long, default_value_t = 0.0)]
    drop_notifications: f64,
    /// Apple's pace in assignments per second; 0 runs the simulator as
    /// fast as it can (the release latency then measures the queue that
    /// builds in front of the MDM).
    #[arg(long, value_name = "N", default_value_t = vppd::cli::demo::APPLE_PACE)]
    apple_rate: f64,
    /// Then a user-based rollout: N users (created at Apple, invited,
    /// accepting over a few seconds) get every app; the summary shows
    /// users invited and associated and the installs released.
    #[arg(long, value_name = "N", default_value_t = 0)]
    users: usize,
    /// Half way through, submit a one-device job with "priority": "high"
    /// and report how long it took (it does not wait for the rollout).
    #[arg(long)]
    urgent: bool,
    /// `[apple] max_events_in_flight` of the demo's daemon (default 2).
    #[arg(long, value_name = "N")]
    max_events_in_flight: Option<usize>,
}

/// Where the daemon's job API is, for the commands that talk to it.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The admin listener (`[admin] listen`), as an http:// or https:// URL.
    #[arg(long, value_name = "URL", env = "VPPD_ADMIN", default_value = vppd::cli::DEFAULT_ADMIN)]
    admin: String,
    /// File holding the admin bearer token, when `[admin] token_file` is set.
    #[arg(long, value_name = "FILE", env = "VPPD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn token(&self) -> anyhow::Result<Option<String>> {
        Ok(vppd::cli::read_admin_token(
            self.admin_token_file.as_deref(),
        )?)
    }
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Add a customer's token, or renew one (same location) under its name.
    Add {
        /// The name jobs use ("token": NAME).
        name: String,
        /// The .vpptoken file as downloaded from Apple School/Business Manager.
        file: PathBuf,
        /// Take the location over from another MDM.
        #[arg(long)]
        takeover: bool,
    },
    /// List every token with its state.
    List,
    /// Forget a token added through the API (not while it has unfinished jobs).
    Rm {
        /// The token's name, as `vppd token list` shows it.
        name: String,
    },
    /// Give a token a new notification secret (the old one is accepted for
    /// 10 more minutes).
    RotateSecret {
        /// The token's name, as `vppd token list` shows it.
        name: String,
    },
}

use vppd::store::StoreError;

fn init_logging(format: LogFormat, default_level: &str) {
    vppd::runtime::logging::init(format, default_level);
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// See Cargo.toml for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vppd: {}", render_error(&e));
            let damaged = |s: &StoreError| {
                matches!(
                    s,
                    StoreError::WentBackwards { .. }
                        | StoreError::Damaged { .. }
                        | StoreError::DatabaseWentBackwards { .. }
                )
            };
            if e.chain().any(|c| {
                c.downcast_ref::<StoreError>().is_some_and(damaged)
                    || matches!(
                        c.downcast_ref::<vppd::daemon::DaemonError>(),
                        Some(vppd::daemon::DaemonError::Store(s)) if damaged(s)
                    )
            }) {
                ExitCode::from(STORE_DAMAGED_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The exit status of a refused or damaged store (EX_CONFIG): the unit's
/// `RestartPreventExitStatus=` keeps systemd from restarting into it again.
const STORE_DAMAGED_EXIT: u8 = 78;

/// A panic inside the store engine while running (sled panics on some
/// damaged files) ends vppd with the store error and [`STORE_DAMAGED_EXIT`]
/// instead of a task dying and the daemon limping on; a panic while opening
/// is left to the store's own guard, which turns it into an error.
fn exit_on_store_panic(data_dir: PathBuf) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let in_store = is_store_panic(
            info.location().map(|l| l.file()),
            thread.name(),
            // Only asked for when the place and the thread do not tell.
            || std::backtrace::Backtrace::force_capture().to_string(),
        );
        if !in_store {
            default(info);
            return;
        }
        if vppd::store::marker::OPENING.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let error = StoreError::Damaged {
            data_dir: data_dir.display().to_string(),
            message: vppd::store::marker::panic_message(info.payload()),
        };
        eprintln!("vppd: {error}");
        std::process::exit(STORE_DAMAGED_EXIT.into());
    }));
}

/// Whether a panic comes from the store engine: raised in sled's sources
/// (wherever they sit: vendored, the registry's `sled-0.34.7`, a git
/// checkout), on a thread of sled's or vppd's flush thread, or with sled's
/// code on the stack (a panic in a library sled called). `backtrace` is the
/// panicking thread's stack as [`std::backtrace::Backtrace`] shows it.
fn is_store_panic(
    file: Option<&str>,
    thread: Option<&str>,
    backtrace: impl FnOnce() -> String,
) -> bool {
    file.is_some_and(in_sled_sources)
        || thread.is_some_and(is_store_thread)
        || backtrace().lines().any(is_sled_frame)
}

/// A source path inside sled's crate: a directory `sled` or `sled-VERSION`
/// holding the crate's `src` (a git checkout: `sled-HASH/REV/src`). vppd's
/// own backend (`src/store/sled/`) holds no `src`: a bug there is not a
/// damaged store.
fn in_sled_sources(file: &str) -> bool {
    let dirs: Vec<&str> = file.split(['/', '\\']).collect();
    dirs.iter().enumerate().any(|(i, d)| {
        let src_at = |k: usize| dirs.get(i + k).is_some_and(|n| *n == "src");
        if *d == "sled" {
            return src_at(1);
        }
        let Some(rest) = d.strip_prefix("sled-") else {
            return false;
        };
        if rest.len() == 16 && rest.chars().all(|c| c.is_ascii_hexdigit()) {
            return src_at(2);
        }
        rest.starts_with(|c: char| c.is_ascii_digit()) && src_at(1)
    })
}

/// sled's I/O pool (`sled-io-N`) and log flusher, and the store's group
/// commit thread (src/store/sled/).
fn is_store_thread(name: &str) -> bool {
    name.starts_with("sled-io-") || name == "log flusher" || name == "vppd-flush"
}

/// A frame of sled's code in a backtrace: `  12: sled::tree::Tree::insert`
/// or `<sled::db::Db as ...>::...`; vppd's own store module
/// (`vppd::store::sled::...`) is not sled.
fn is_sled_frame(line: &str) -> bool {
    let symbol = line.trim_start();
    let symbol = symbol
        .split_once(": ")
        .filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
        .map_or(symbol, |(_, s)| s);
    symbol.starts_with("sled::") || symbol.starts_with("<sled::")
}

/// The error and its causes on one line, each cause only once: many errors
/// already quote their source in their own text, and `{:#}` would repeat it
/// ("No such file or directory (os error 2): No such file or directory (os
/// error 2)").
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    explain_store_lock(out)
}

/// sled reports a store held by another process with Debug output of an io
/// error ("IO error: could not acquire lock on \"...\": Os { code: 11, kind:
/// WouldBlock, .. }"); say what it means and what to do instead.
fn explain_store_lock(message: String) -> String {
    const MARK: &str = "could not acquire lock on";
    if !message.contains(MARK) {
        return message;
    }
    let prefix = message
        .find("IO error")
        .map(|i| message[..i].trim_end().trim_end_matches(':').to_string())
        .unwrap_or_else(|| "store".into());
    format!(
        "{prefix}: another process has this store open (is another `vppd run` using the same data_dir?); stop it, or give this one its own data_dir"
    )
}

/// Files vppd creates (the store, the generated secret) are private to its
/// user whatever umask it was started with; systemd's UMask=0077 does the
/// same under the stock unit.
fn private_umask() {
    #[cfg(unix)]
    // SAFETY: umask cannot fail and touches only the process's mask; it runs
    // before any thread that could be creating files.
    unsafe {
        libc::umask(0o077);
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            accept_store_loss,
        } => run_daemon(&config, accept_store_loss),
        Command::Demo(args) => demo(args),
        Command::Sim(args) => {
            init_logging(LogFormat::Plain, "info");
            runtime()?.block_on(vppd::sim::cli::run(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit { admin, file } => {
            let token = admin.token()?;
            let id =
                runtime()?.block_on(vppd::cli::submit(&admin.admin, &file, token.as_deref()))?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin, job, watch } => status(&admin, job.as_deref(), watch),
        Command::Cancel { admin, job } => {
            let token = admin.token()?;
            let out =
                runtime()?.block_on(vppd::cli::cancel(&admin.admin, &job, token.as_deref()))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Failures { admin, job, csv } => {
            let token = admin.token()?;
            let out = runtime()?.block_on(vppd::cli::failures(
                &admin.admin,
                &job,
                csv,
                token.as_deref(),
            ))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sink { listen, quiet } => {
            init_logging(LogFormat::Plain, "info");
            runtime()?.block_on(vppd::cli::sink::run(&listen, quiet))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { admin, action } => token(admin, action),
        Command::CheckConfig { config } => {
            print!("{}", vppd::cli::check_config(&config)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            job,
            config,
            max_assets,
            max_serial_numbers,
            max_client_user_ids,
        } => {
            let shape = vppd::domain::plan::Shape::uniform(
                max_assets.max(1),
                max_serial_numbers.max(1),
                max_client_user_ids.max(1),
            );
            print!("{}", vppd::cli::plan(&job, config.as_deref(), shape)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vppd", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `vppd run`: until SIGTERM or SIGINT, then drain.
fn run_daemon(config: &Path, accept_store_loss: bool) -> anyhow::Result<ExitCode> {
    private_umask();
    let mut config = Config::load(config)?;
    config.accept_store_loss = accept_store_loss;
    init_logging(config.logging.format, "info");
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if !config.store.is_shared() && config.create_data_dir()? {
        tracing::info!(data_dir = %config.data_dir.display(), "created data_dir (mode 0700)");
    }
    exit_on_store_panic(config.data_dir.clone());
    runtime()?.block_on(async move {
        let metrics = Arc::new(vppd::runtime::metrics::Metrics::new());
        let listeners = vppd::runtime::activation::take(&config)?;
        let daemon = vppd::daemon::Daemon::start_on(config, metrics, listeners).await?;
        wait_for_signal().await?;
        daemon.shutdown().await;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let DemoArgs {
        devices,
        apps,
        data_dir,
        quiet,
        reassign,
        drop_notifications,
        apple_rate,
        users,
        urgent,
        max_events_in_flight,
    } = args;
    let devices = devices.unwrap_or(if users > 0 { 100 } else { 10_000 });
    if devices == 0 || apps == 0 {
        bail!("--devices and --apps must be at least 1");
    }
    if !(0.0..=1.0).contains(&drop_notifications) {
        bail!("--drop-notifications must be between 0 and 1");
    }
    // Warnings only: info lines would tear the progress bar.
    init_logging(LogFormat::Plain, "warn");
    let mut opts = vppd::cli::demo::DemoOptions {
        devices,
        apps,
        data_dir,
        progress: !quiet,
        reassign,
        users,
        urgent,
        max_events_in_flight,
        ..Default::default()
    };
    if max_events_in_flight == Some(0) {
        bail!("--max-events-in-flight must be at least 1");
    }
    opts.sim.notifications.drop_rate = drop_notifications;
    if !(apple_rate >= 0.0 && apple_rate.is_finite()) {
        bail!("--apple-rate must be a number of assignments per second, 0 for full speed");
    }
    opts.sim.assignments_per_second = (apple_rate > 0.0).then_some(apple_rate);
    let report = runtime()?.block_on(vppd::cli::demo::run(opts))?;
    print!("{}", report.render());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(admin: &AdminArgs, job: Option<&str>, watch: bool) -> anyhow::Result<ExitCode> {
    let token = admin.token()?;
    let state = runtime()?.block_on(vppd::cli::status(
        &admin.admin,
        job,
        watch,
        token.as_deref(),
    ))?;
    Ok(match state.as_deref() {
        Some("failed") | Some("canceled") if watch => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn token(admin: AdminArgs, action: TokenAction) -> anyhow::Result<ExitCode> {
    let token = admin.token()?;
    let token = token.as_deref();
    let admin = admin.admin;
    let rt = runtime()?;
    let out = match action {
        TokenAction::Add {
            name,
            file,
            takeover,
        } => rt.block_on(vppd::cli::token_add(&admin, &name, &file, takeover, token))?,
        TokenAction::List => rt.block_on(vppd::cli::token_list(&admin, token))?,
        TokenAction::Rm { name } => rt.block_on(vppd::cli::token_rm(&admin, &name, token))?,
        TokenAction::RotateSecret { name } => {
            rt.block_on(vppd::cli::token_rotate_secret(&admin, &name, token))?
        }
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    // A second signal while draining stops at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(1);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` must say what every flag and argument is for.
    #[test]
    fn every_argument_has_a_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
                missing.push(path.clone());
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn a_panic_in_sled_is_a_store_panic_wherever_its_sources_sit() {
        let no_stack = || String::new();
        for file in [
            "vendor/sled/src/pagecache/mod.rs",
            "/home/u/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/sled-0.34.7/src/tree.rs",
            "/home/u/.cargo/git/checkouts/sled-1a2b3c4d5e6f7a8b/0123abc/src/node.rs",
            "C:\\Users\\u\\.cargo\\registry\\src\\x\\sled-0.34.7\\src\\db.rs",
        ] {
            assert!(is_store_panic(Some(file), None, no_stack), "{file}");
        }
        for file in [
            "src/store/sled/mod.rs",
            "/srv/vppd/src/store/sled/tx.rs",
            "src/stages/submit.rs",
            "/home/u/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tokio-1.47.1/src/runtime/task/mod.rs",
            "/home/sled-builds/vppd/src/main.rs",
            "/home/u/.cargo/registry/src/x/sledge-1.0.0/src/lib.rs",
        ] {
            assert!(
                !is_store_panic(Some(file), Some("tokio-runtime-worker"), no_stack),
                "{file}"
            );
        }
        assert!(!is_store_panic(None, None, no_stack));
    }

    #[test]
    fn a_panic_on_a_store_thread_is_a_store_panic() {
        for thread in ["sled-io-3", "log flusher", "vppd-flush"] {
            assert!(
                is_store_panic(
                    Some("/x/crossbeam-epoch-0.9.18/src/guard.rs"),
                    Some(thread),
                    String::new
                ),
                "{thread}"
            );
        }
        assert!(!is_store_panic(Some("src/x.rs"), Some("main"), String::new));
    }

    #[test]
    fn a_panic_under_sled_is_a_store_panic() {
        let under_sled = "   0: std::panicking::begin_panic\n  12: crossbeam_epoch::guard::Guard::defer\n  13: sled::pagecache::PageCache::pull\n  14: vppd::store::sled::SledStore::job\n";
        assert!(is_store_panic(
            Some("/x/crossbeam-epoch-0.9.18/src/guard.rs"),
            Some("tokio-runtime-worker"),
            || under_sled.to_string()
        ));
        let impl_frame = "   7: <sled::tree::Tree as core::ops::Deref>::deref\n";
        assert!(is_store_panic(None, None, || impl_frame.to_string()));
        let own = "   3: vppd::store::sled::SledStore::job\n   4: vppd::stages::submit::run\n      at ./src/submit.rs:10:5\n";
        assert!(!is_store_panic(None, None, || own.to_string()));
    }

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = format!("cannot read config file /x.toml: {io}");
        let e = anyhow::Error::new(io).context(text.clone());
        assert_eq!(render_error(&e), text);
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render_error(&e), "outer: inner");
    }

    #[test]
    fn a_held_store_lock_is_explained() {
        let sled_text = "store at /var/lib/vppd: IO error: could not acquire lock on \"/var/lib/vppd/db\": Os { code: 11, kind: WouldBlock, message: \"Resource temporarily unavailable\" }";
        let out = explain_store_lock(sled_text.into());
        assert!(
            out.starts_with("store at /var/lib/vppd: another process"),
            "{out}"
        );
        assert!(!out.contains("Os {"), "{out}");
    }
}
