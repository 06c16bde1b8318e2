//! The `portcullis` command: run the gateway, check a config, inspect the XDP fast path.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::{
    access_log::AccessLog,
    config::Config,
    metrics::Metrics,
    proxy::snapshot::ConfigSnapshot,
    runtime::{
        admin::{AdminState, AdminToken},
        control::{Handover, TakeOver},
        listener::{bind_all, ListenerSet},
        live::Live,
        shutdown::{watch_signals, DrainFlag, DrainMode},
        worker::{spawn_workers, Observers},
    },
    xdp,
};
use tracing::{error, info, warn};

/// mimalloc rather than glibc malloc: see the dependency's comment in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An API gateway with an XDP first line of defence"
)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "config/gateway.toml")]
    config: PathBuf,
    /// Take over from the gateway running on the same config (its control socket): receive
    /// its listening sockets and data directory, then let it drain and exit.
    #[arg(long)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config file and exit: 0 when valid, 1 with the error otherwise.
    Check,
    /// Ask the running gateway to reload its config file; prints whether it was accepted, or
    /// the error that refused it (the running config then keeps serving).
    Reload,
    /// Create API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Inspect the XDP program of a running gateway through its pinned maps.
    Xdp {
        #[command(subcommand)]
        command: XdpCommand,
    },
    /// The LLM key vault: provider keys, virtual keys, budgets, spend (through the running
    /// gateway, or on the store when it is stopped).
    Vault {
        #[command(subcommand)]
        command: portcullis::runtime::vault_cli::VaultCommand,
    },
    /// The running gateway's response cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Purge entries: of one resource (`--key https://host/path?query`), of every resource
    /// under a prefix (`--prefix https://host/images/`), or tagged (`--tag product-42`); sent
    /// to the other hosts with `[cluster]`.
    Purge {
        #[arg(long, conflicts_with_all = ["prefix", "tag"], required_unless_present_any = ["prefix", "tag"])]
        key: Option<String>,
        #[arg(long, conflicts_with = "tag")]
        prefix: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh API key (256 random bits) and the config lines holding its hash.
    New {
        /// The consumer the key belongs to.
        #[arg(long)]
        consumer: String,
    },
}

#[derive(Subcommand)]
enum XdpCommand {
    /// Print packet counters, sources (most dropped first) and bans.
    Stats,
    /// Add, list or remove bans.
    Ban {
        #[command(subcommand)]
        command: BanCommand,
    },
}

#[derive(Subcommand)]
enum BanCommand {
    /// Ban an address (for IPv6: its configured prefix).
    Add {
        address: std::net::IpAddr,
        /// How long, such as "10m"; default: the config's `ban_duration`.
        #[arg(long)]
        duration: Option<String>,
    },
    /// List the bans in force.
    List,
    /// Lift a ban.
    Remove { address: std::net::IpAddr },
}

/// Log lines held in memory while stderr is not being read; beyond it lines are dropped and
/// counted, never waited for.
const LOG_BUFFER_LINES: usize = 16_384;
/// How often held-back and dropped log lines are reported.
const LOG_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reports, every [`LOG_REPORT_INTERVAL`], lines the throttle held back and lines the writer
/// dropped. A report that is itself dropped is repeated until one gets through, so the count
/// appears once stderr is read again.
fn report_held_back_lines(dropped: tracing_appender::non_blocking::ErrorCounter) {
    let mut reported_dropped = 0;
    loop {
        std::thread::sleep(LOG_REPORT_INTERVAL);
        for kind in portcullis::log_throttle::Noisy::ALL {
            let n = portcullis::log_throttle::take_suppressed(kind);
            if n > 0 {
                tracing::warn!(
                    kind = kind.name(),
                    suppressed = n,
                    "log lines of this kind held back (at most {} a second)",
                    portcullis::log_throttle::LINES_PER_SECOND
                );
            }
        }
        let now = dropped.dropped_lines();
        if now > reported_dropped {
            tracing::warn!(
                dropped = now,
                "log lines dropped since start: stderr was not read fast enough"
            );
            // Counted as reported only once a later look finds no new drops.
            if dropped.dropped_lines() == now {
                reported_dropped = now;
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Workers must never block on a slow or stalled stderr (a full pipe nobody reads): lines go
    // through a bounded queue to a writer thread and are dropped, and counted, when it is full.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("portcullis-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = std::thread::Builder::new()
        .name("portcullis-logcount".into())
        .spawn(move || report_held_back_lines(dropped));
    if let Some(Command::Keys {
        command: KeysCommand::New { consumer },
    }) = &cli.command
    {
        let (key, hash) = portcullis::auth::new_key();
        println!("API key for {consumer} (shown once, never stored; give it to the consumer now):\n{key}\n");
        println!("Config lines holding its hash:\n[[consumers]]\nid = \"{consumer}\"\napi_keys = [\"{hash}\"]");
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Keys { .. } => unreachable!("handled before the config is loaded"),
        Command::Check => {
            // Like `nginx -t`: the files the TLS settings name are read too.
            let files = portcullis::tls::build_all(&config.tls, None)
                .map(drop)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    for (name, u) in &config.upstreams {
                        if let Some(t) = &u.tls {
                            portcullis::tls::client::build(name, t)?;
                        }
                    }
                    Ok(())
                });
            match files {
                Ok(()) => {
                    println!("{}: ok", cli.config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", cli.config.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reload => ask_gateway(&config, "reload", |reply| {
            if reply.starts_with("ok") {
                println!("{reply}");
                true
            } else {
                eprintln!("{reply}");
                false
            }
        }),
        Command::Vault { command } => match portcullis::runtime::vault_cli::run(&config, command) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cache {
            command: CacheCommand::Purge { key, prefix, tag },
        } => {
            let purge = match (key, prefix, tag) {
                (Some(k), _, _) => portcullis::cache::Purge::Key(k),
                (_, Some(p), _) => portcullis::cache::Purge::Prefix(p),
                (_, _, Some(t)) => portcullis::cache::Purge::Tag(t),
                _ => unreachable!("clap requires one"),
            };
            let body = serde_json::to_string(&purge).expect("a purge serialises");
            ask_gateway(&config, &format!("cache purge {body}"), |reply| {
                let (status, json) = reply.split_once(' ').unwrap_or(("500", reply));
                println!("{json}");
                status == "200"
            })
        }
        Command::Xdp { command } => match xdp_command(&config, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run => match run(config, cli.config, cli.upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(config: Config, path: PathBuf, upgrade: bool) -> anyhow::Result<()> {
    let workers = config.server.workers.resolve();
    let control_socket = portcullis::runtime::control::socket_path(&config);
    let (takeover, listeners, bound) = if upgrade {
        let mut takeover = TakeOver::request(&control_socket).with_context(|| {
            format!(
                "cannot take over from the gateway on {}",
                control_socket.display()
            )
        })?;
        let listeners = std::mem::take(&mut takeover.listeners);
        // Dropping `takeover` on a mismatch tells the old process to keep serving.
        if listeners.len() != workers {
            anyhow::bail!(
                "the running gateway has {} workers; this config asks for {workers}: an upgrade keeps the worker count",
                listeners.len(),
            );
        }
        let handed = listeners[0]
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        info!(
            "upgrade: took over {} listening sockets",
            workers * handed.len()
        );
        (Some(takeover), listeners, handed)
    } else {
        let (listeners, bound) = bind_all(&config.server.listen_addresses(), workers)?;
        (None, listeners, bound)
    };
    // The sockets are known by the addresses they are bound to; the config's list then decides
    // (after an upgrade it may add or drop addresses, matched by address, port 0 by IP).
    // Each socket with the TLS profile the config gives its address (port 0: its IP), so no
    // connection is ever accepted before its listener knows whether it speaks TLS.
    let known: Vec<portcullis::config::Listen> = if takeover.is_none() {
        // Bound here, in config order.
        bound
            .iter()
            .zip(&config.server.listen)
            .map(|(a, l)| portcullis::config::Listen {
                address: *a,
                ..l.clone()
            })
            .collect()
    } else {
        bound
            .iter()
            .map(|a| {
                let configured = config
                    .server
                    .listen
                    .iter()
                    .find(|l| l.address == *a)
                    .or_else(|| {
                        config
                            .server
                            .listen
                            .iter()
                            .find(|l| l.address.port() == 0 && l.address.ip() == a.ip())
                    });
                portcullis::config::Listen {
                    address: *a,
                    ..configured.cloned().unwrap_or_else(|| (*a).into())
                }
            })
            .collect()
    };
    let (listener_set, worker_listeners) = ListenerSet::new(&known, listeners)?;
    let changed = listener_set.change_to(&config.server.listen)?;
    if !changed.is_empty() {
        info!(added = ?changed.added, removed = ?changed.removed, "listen addresses changed by the upgrade");
    }
    let bound = listener_set.bound();
    let xdp_guard = match &config.xdp {
        None => None,
        // The program stays attached across an upgrade: take over its pinned links and maps.
        Some(xdp_config) if takeover.is_some() => {
            let mut guard = xdp::adopt(xdp_config).context("cannot take over the XDP program")?;
            guard
                .apply(xdp_config, &xdp::policed_ports(xdp_config, &bound))
                .context("cannot write this config's XDP policy")?;
            info!("upgrade: took over the attached XDP program and its maps");
            Some(guard)
        }
        Some(xdp_config) => {
            let ports = xdp::policed_ports(xdp_config, &bound);
            match xdp::attach(xdp_config, &ports) {
                Ok(guard) => {
                    for (iface, mode) in guard.interfaces() {
                        info!(interface = iface, mode, ?ports, "XDP program attached");
                    }
                    Some(guard)
                }
                Err(e) if xdp_config.optional => {
                    warn!("XDP unavailable, running without it: {e:#}");
                    None
                }
                Err(e) => return Err(e.context("XDP is configured but could not be set up (set `xdp.optional = true` to run without it)")),
            }
        }
    };
    let drain = DrainFlag::default();
    watch_signals(drain.clone())?;
    // The ban hook only makes sense with the program attached.
    let bans = match (&xdp_guard, &config.xdp) {
        (Some(_), Some(x)) => xdp::start_ban_hook(x),
        _ => None,
    };
    let flush_interval = config.quotas.flush_interval.get();
    let data_dir = config.quotas.data_dir.clone();
    let handover = Handover {
        listeners: listener_set.clone(),
        drain: drain.clone(),
        data_dir,
    };
    let config_admin = config.admin.clone();
    let access_log = match &config.access_log {
        Some(c) => {
            let log = AccessLog::start(c)?;
            reopen_on_usr1(log.clone())?;
            Some(log)
        }
        None => None,
    };
    // Read now, so a missing or short token stops the start with a clear message.
    let admin_token = config_admin
        .as_ref()
        .map(AdminToken::load)
        .transpose()?
        .flatten();
    let snapshot = ConfigSnapshot::new(config)?;
    snapshot.quota_store.start_flusher(flush_interval)?;
    let quota_store = snapshot.quota_store.clone();
    let access_log_for_admin = access_log.clone();
    let metrics = match &config_admin {
        Some(admin) => Some(Metrics::start(admin.percentile_window.get())?),
        None => None,
    };
    let live = Live::new(path, snapshot, listener_set, xdp_guard, metrics.clone());
    // Forget rate-limit state that has fully recovered, so memory follows active keys.
    let sweeping = live.clone();
    std::thread::Builder::new()
        .name("portcullis-limits".into())
        .spawn(move || loop {
            std::thread::sleep(portcullis::limits::SWEEP_INTERVAL);
            for limit in sweeping.snapshot().routes.all_limits() {
                limit.sweep();
            }
        })?;
    portcullis::runtime::control::reload_on_hangup(live.clone())?;
    if !live.snapshot().config.tls.is_empty() {
        portcullis::runtime::cert_watch::start(live.clone())?;
    }
    let handles = spawn_workers(
        live.published(),
        worker_listeners,
        drain.clone(),
        bans,
        Observers {
            metrics: metrics.clone(),
            access_log: access_log.clone(),
        },
    )?;

    match takeover {
        None => portcullis::runtime::control::serve(&control_socket, live.clone(), handover)?,
        Some(takeover) => {
            takeover
                .listening()
                .context("the old process did not confirm the upgrade")?;
            // Only now: had the upgrade failed, the old process would still need its socket.
            portcullis::runtime::control::serve_replacing(&control_socket, live.clone(), handover)?;
            info!("upgrade: the old process is draining");
        }
    }
    // After an upgrade, only once the old process confirmed: until then it may still need its
    // admin socket, and a failure here must not undo an upgrade that has happened.
    if let (Some(admin), Some(metrics)) = (&config_admin, metrics) {
        let state = AdminState {
            token: admin_token,
            metrics,
            live: live.clone(),
            drain: drain.clone(),
            workers,
            access_log: access_log_for_admin,
        };
        let started = portcullis::runtime::admin::start(&admin.listen, Arc::new(state), upgrade);
        match started {
            Ok(_) => {}
            Err(e) if upgrade => error!("the admin API could not start after the upgrade: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    for addr in &bound {
        info!(workers, "listening on {addr}");
    }
    let mut panicked = false;
    for handle in handles {
        panicked |= handle.join().is_err();
    }
    // Every worker handed its last lines over: let the writer finish them (bounded).
    if let Some(log) = &access_log {
        log.finish(std::time::Duration::from_secs(2));
    }
    // After an upgrade the path, the XDP program and its pins belong to the new process.
    let mut xdp_guard = live.take_xdp();
    if drain.mode() == Some(DrainMode::Upgrade) {
        if let Some(guard) = xdp_guard.as_mut() {
            guard.keep_attached();
        }
    } else {
        let _ = std::fs::remove_file(&control_socket);
    }
    drop(xdp_guard);
    // A clean stop saves every quota counter and the vault's spend.
    if let Err(e) = quota_store.flush() {
        error!("cannot save quota counters: {e}");
    }
    if let Some(vault) = &live.snapshot().vault {
        if let Err(e) = vault.flush_spend() {
            error!("cannot save vault spend: {e}");
        }
    }
    if panicked {
        anyhow::bail!("a worker thread panicked");
    }
    info!("stopped");
    Ok(())
}

/// Reopens the access log on SIGUSR1 (after logrotate moved it).
fn reopen_on_usr1(log: Arc<AccessLog>) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
    std::thread::Builder::new()
        .name("portcullis-sigusr1".into())
        .spawn(move || {
            for _ in signals.forever() {
                info!("SIGUSR1: reopening the access log");
                log.reopen();
            }
        })?;
    Ok(())
}

fn xdp_command(config: &Config, command: XdpCommand) -> anyhow::Result<()> {
    let xdp_config = config
        .xdp
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the config has no [xdp] section"))?;
    let pin_path = &xdp_config.pin_path;
    match command {
        XdpCommand::Stats => {
            let stats = xdp::read_pinned_stats(pin_path)?;
            for (name, value) in &stats.counters {
                println!("counter {name} {value}");
            }
            for s in &stats.sources {
                println!("source {} packets={} drops={}", s.addr, s.packets, s.drops);
            }
            for (addr, left) in xdp::BanTable::open(pin_path)?.list()? {
                println!("ban {addr} expires_in={}s", left.as_secs());
            }
        }
        XdpCommand::Ban {
            command: BanCommand::Add { address, duration },
        } => {
            let duration = match duration {
                Some(d) => portcullis::config::parse_duration(&d).map_err(anyhow::Error::msg)?,
                None => xdp_config.ban_duration.get(),
            };
            xdp::BanTable::open(pin_path)?.add(address, duration)?;
            println!("banned {address} for {}s", duration.as_secs());
        }
        XdpCommand::Ban {
            command: BanCommand::List,
        } => {
            for (addr, left) in xdp::BanTable::open(pin_path)?.list()? {
                println!("{addr} expires_in={}s", left.as_secs());
            }
        }
        XdpCommand::Ban {
            command: BanCommand::Remove { address },
        } => {
            if xdp::BanTable::open(pin_path)?.remove(address)? {
                println!("unbanned {address}");
            } else {
                anyhow::bail!("{address} was not banned");
            }
        }
    }
    Ok(())
}

/// Sends `command` to the running gateway's control socket; `judge` prints the reply and says
/// whether it succeeded.
fn ask_gateway(
    config: &portcullis::config::Config,
    command: &str,
    judge: impl FnOnce(&str) -> bool,
) -> ExitCode {
    let socket = portcullis::runtime::control::socket_path(config);
    match portcullis::runtime::control::send(&socket, command) {
        Ok(reply) if judge(&reply) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!(
                "error: cannot reach the gateway's control socket {}: {e}",
                socket.display()
            );
            ExitCode::FAILURE
        }
    }
}
