//! The `vppd` binary: a thin layer over the library. Errors become a
//! message on stderr and a non-zero exit here, and nowhere else.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{CommandFactory, Parser, Subcommand};

use vppd::config::{Config, LogFormat};

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
    },
    /// Run one self-contained job on loopback: the Apple simulator, the
    /// daemon and a stand-in MDM in one process; exits non-zero if any
    /// assignment or install command is missing or duplicated.
    Demo {
        /// Devices (serial numbers) in the job.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Apps assigned to every device.
        #[arg(long, default_value_t = 25)]
        apps: usize,
        /// Keep the store here instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print no progress bar.
        #[arg(long)]
        quiet: bool,
        /// Drop this share (0 to 1) of Apple's notifications, to watch the
        /// event status and sync fallbacks finish the job.
        #[arg(long, default_value_t = 0.0)]
        drop_notifications: f64,
    },
    /// Serve the Apple App and Book Management API v2 simulator.
    Sim(Box<vppd::sim::cli::SimArgs>),
    /// Post a job file to a running daemon; prints the job id.
    Submit {
        /// The admin listener, e.g. http://127.0.0.1:9180
        #[arg(long, value_name = "URL")]
        admin: String,
        /// File holding the admin bearer token, when admin.token_file is set.
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
        /// The job, as JSON (see docs/openapi.json).
        file: PathBuf,
    },
    /// Show job progress (all jobs without JOB).
    Status {
        #[arg(long, value_name = "URL")]
        admin: String,
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
        /// A job id.
        job: Option<String>,
        /// Show a live progress bar until the job ends.
        #[arg(long)]
        watch: bool,
    },
    /// Validate a config file and the files it names.
    CheckConfig {
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
        #[arg(long, default_value_t = 25)]
        max_assets: u32,
        #[arg(long, default_value_t = 1000)]
        max_serial_numbers: u32,
        #[arg(long, default_value_t = 1000)]
        max_client_user_ids: u32,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vppd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            init_logging(config.logging.format, "info");
            runtime()?.block_on(async move {
                let metrics = Arc::new(vppd::metrics::Metrics::new());
                let daemon = vppd::daemon::Daemon::start(config, metrics).await?;
                wait_for_signal().await?;
                daemon.shutdown().await;
                Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
            })
        }
        Command::Demo {
            devices,
            apps,
            data_dir,
            quiet,
            drop_notifications,
        } => {
            if devices == 0 || apps == 0 {
                bail!("--devices and --apps must be at least 1");
            }
            if !(0.0..=1.0).contains(&drop_notifications) {
                bail!("--drop-notifications must be between 0 and 1");
            }
            // Warnings only: info lines would tear the progress bar.
            init_logging(LogFormat::Plain, "warn");
            let mut opts = vppd::demo::DemoOptions {
                devices,
                apps,
                data_dir,
                progress: !quiet,
                ..Default::default()
            };
            opts.sim.notifications.drop_rate = drop_notifications;
            let report = runtime()?.block_on(vppd::demo::run(opts))?;
            print!("{}", report.render());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Sim(args) => {
            init_logging(LogFormat::Plain, "info");
            runtime()?.block_on(vppd::sim::cli::run(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            admin,
            admin_token_file,
            file,
        } => {
            let token = vppd::cli::read_admin_token(admin_token_file.as_deref())?;
            let id = runtime()?.block_on(vppd::cli::submit(&admin, &file, token.as_deref()))?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            admin,
            admin_token_file,
            job,
            watch,
        } => {
            let token = vppd::cli::read_admin_token(admin_token_file.as_deref())?;
            let state = runtime()?.block_on(vppd::cli::status(
                &admin,
                job.as_deref(),
                watch,
                token.as_deref(),
            ))?;
            Ok(match state.as_deref() {
                Some("failed") | Some("canceled") if watch => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            })
        }
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
            let shape = vppd::plan::Shape {
                max_assets: max_assets.max(1),
                max_serials: max_serial_numbers.max(1),
                max_users: max_client_user_ids.max(1),
            };
            print!("{}", vppd::cli::plan(&job, config.as_deref(), shape)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vppd", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
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
