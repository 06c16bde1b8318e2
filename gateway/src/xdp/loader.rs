//! Loads the XDP program, attaches it to the configured interfaces, syncs the port map and
//! pins the maps and the links under `pin_path`. Detaches and unpins on drop, except after a
//! binary upgrade: then the program stays attached through its pinned links, and the new
//! process adopts the links and maps (so bans and per-source state survive).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap,
    },
    programs::{links::FdLink, links::PinnedLink, Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use ipnet::IpNet;
use portcullis_common::{
    LogBudget, Settings, MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_DENY_V4, MAP_DENY_V6, MAP_LOG_BUDGET,
    MAP_PORTS, MAP_SETTINGS, MAP_SOURCES, PINNED_MAPS, XDP_PROGRAM_NAME,
};
use tracing::{info, warn};

use super::policy::{parse_cidr, settings};
use crate::config::{XdpConfig, XdpMode};

/// How often the program's log ring buffer is drained.
const LOG_POLL: Duration = Duration::from_millis(200);

#[cfg(portcullis_ebpf_embedded)]
static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-xdp.o"));
#[cfg(not(portcullis_ebpf_embedded))]
static EMBEDDED_OBJECT: &[u8] = &[];

/// The BPF object bytes: `xdp.object`, else `$PORTCULLIS_EBPF_OBJECT`, else the embedded one.
pub fn object_bytes(config: &XdpConfig) -> anyhow::Result<Vec<u8>> {
    let path = config
        .object
        .clone()
        .or_else(|| std::env::var_os("PORTCULLIS_EBPF_OBJECT").map(PathBuf::from));
    if let Some(path) = path {
        return std::fs::read(&path)
            .with_context(|| format!("cannot read the XDP object {}", path.display()));
    }
    if EMBEDDED_OBJECT.is_empty() {
        bail!("this build has no XDP object embedded: run `cargo xtask build-ebpf` and rebuild, or set `xdp.object`");
    }
    Ok(EMBEDDED_OBJECT.to_vec())
}

/// A loaded and attached program. Dropping it detaches the program and removes the pins,
/// unless [`XdpGuard::keep_attached`] was called.
pub struct XdpGuard {
    /// The loaded object; `None` for a program adopted from the process before an upgrade.
    ebpf: Option<Ebpf>,
    /// For an adopted program: its policy maps, opened from their pins.
    adopted_maps: std::collections::HashMap<&'static str, aya::maps::Map>,
    pin_path: PathBuf,
    interfaces: Vec<(String, AyaXdpMode)>,
    /// One pinned link per interface: the program stays attached while a pin exists.
    links: Vec<PinnedLink>,
    keep_on_drop: bool,
    log_stop: Arc<AtomicBool>,
    log_thread: Option<JoinHandle<()>>,
}

/// The maps [`XdpGuard::apply`] writes.
const POLICY_MAPS: [&str; 6] = [
    MAP_SETTINGS,
    MAP_PORTS,
    MAP_DENY_V4,
    MAP_DENY_V6,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
];

/// Where the link attaching the program to `iface` is pinned.
fn link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(format!("link-{iface}"))
}

impl XdpGuard {
    /// Interfaces the program is attached to, with the mode that worked.
    pub fn interfaces(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.interfaces
            .iter()
            .map(|(i, m)| (i.as_str(), mode_name(*m)))
    }

    /// Writes the policy of `config` (settings, ports, deny and allow lists) into the maps of
    /// the attached program. Used at start and again on reload: the program stays attached.
    pub fn apply(&mut self, config: &XdpConfig, ports: &[u16]) -> anyhow::Result<()> {
        let mut settings_map: Array<_, Settings> = Array::try_from(self.map_mut(MAP_SETTINGS)?)?;
        settings_map.set(0, settings(config), 0)?;
        let mut port_map: HashMap<_, u16, u8> = HashMap::try_from(self.map_mut(MAP_PORTS)?)?;
        let stale: Vec<u16> = port_map
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !ports.contains(p))
            .collect();
        for port in stale {
            port_map.remove(&port)?;
        }
        for port in ports {
            port_map.insert(port, 1, 0)?;
        }
        let parse =
            |list: &[String]| -> Vec<IpNet> { list.iter().filter_map(|c| parse_cidr(c)).collect() };
        let (deny, allow) = (parse(&config.deny), parse(&config.allow));
        self.sync_v4(MAP_DENY_V4, &deny)?;
        self.sync_v6(MAP_DENY_V6, &deny)?;
        self.sync_v4(MAP_ALLOW_V4, &allow)?;
        self.sync_v6(MAP_ALLOW_V6, &allow)?;
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        match self.ebpf.as_mut() {
            Some(ebpf) => ebpf.map_mut(name),
            None => self.adopted_maps.get_mut(name),
        }
        .ok_or_else(|| anyhow!("the program has no map {name}"))
    }

    /// Leaves the program attached and every pin in place when dropped: a binary upgrade
    /// handed them to the new process.
    pub fn keep_attached(&mut self) {
        self.keep_on_drop = true;
    }

    fn sync_v4(&mut self, name: &str, nets: &[IpNet]) -> anyhow::Result<()> {
        let keys = nets.iter().filter_map(|n| match n {
            IpNet::V4(v4) => Some(Key::new(u32::from(v4.prefix_len()), v4.network().octets())),
            IpNet::V6(_) => None,
        });
        self.sync_trie(name, keys.collect())
    }

    fn sync_v6(&mut self, name: &str, nets: &[IpNet]) -> anyhow::Result<()> {
        let keys = nets.iter().filter_map(|n| match n {
            IpNet::V6(v6) => Some(Key::new(u32::from(v6.prefix_len()), v6.network().octets())),
            IpNet::V4(_) => None,
        });
        self.sync_trie(name, keys.collect())
    }

    /// Makes the trie `name` hold exactly `wanted`.
    fn sync_trie<K: aya::Pod>(&mut self, name: &str, wanted: Vec<Key<K>>) -> anyhow::Result<()> {
        let mut trie: LpmTrie<_, K, u8> = LpmTrie::try_from(self.map_mut(name)?)?;
        let old: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
        for key in old {
            trie.remove(&key)?;
        }
        for key in &wanted {
            trie.insert(key, 1, 0)?;
        }
        Ok(())
    }
}

impl Drop for XdpGuard {
    fn drop(&mut self) {
        self.log_stop.store(true, Ordering::Release);
        if let Some(t) = self.log_thread.take() {
            let _ = t.join();
        }
        if self.keep_on_drop {
            info!(pin_path = %self.pin_path.display(), "XDP program left attached for the upgraded process");
            return;
        }
        for link in self.links.drain(..) {
            match link.unpin() {
                Ok(fd_link) => {
                    let _ = aya::programs::links::Link::detach(fd_link);
                }
                Err(e) => warn!("cannot unpin an XDP link: {e}"),
            }
        }
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(self.pin_path.join(name));
        }
        info!(pin_path = %self.pin_path.display(), "XDP program detached");
    }
}

/// Takes over the program the process before a binary upgrade left attached: its pinned links
/// (checked for every configured interface) and pinned maps stay as they are, so bans and
/// per-source state carry over. Its policy maps are opened from their pins, so
/// [`XdpGuard::apply`] writes the new process's policy into them.
pub fn adopt(config: &XdpConfig) -> anyhow::Result<XdpGuard> {
    let mut adopted_maps = std::collections::HashMap::new();
    for name in POLICY_MAPS {
        adopted_maps.insert(name, super::stats::open_pinned(&config.pin_path, name)?);
    }
    let mut links = Vec::new();
    let mut interfaces = Vec::new();
    for iface in config.interface.to_vec() {
        let pin = link_pin(&config.pin_path, &iface);
        let link = PinnedLink::from_pin(&pin).with_context(|| {
            format!(
                "no XDP link pinned at {} to take over (is the running gateway attached to `{iface}`?)",
                pin.display()
            )
        })?;
        links.push(link);
        interfaces.push((iface, AyaXdpMode::Default));
    }
    Ok(XdpGuard {
        ebpf: None,
        adopted_maps,
        pin_path: config.pin_path.clone(),
        interfaces,
        links,
        keep_on_drop: false,
        log_stop: Arc::new(AtomicBool::new(false)),
        log_thread: None,
    })
}

fn mode_name(m: AyaXdpMode) -> &'static str {
    match m {
        AyaXdpMode::Driver => "driver",
        AyaXdpMode::Skb => "skb",
        AyaXdpMode::Hardware => "hardware",
        AyaXdpMode::Default => "default",
    }
}

/// Loads the program, attaches it everywhere `config` says, and protects `ports`.
pub fn attach(config: &XdpConfig, ports: &[u16]) -> anyhow::Result<XdpGuard> {
    let object = object_bytes(config)?;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_SOURCES, config.max_sources)
        .load(&object)
        .context("cannot load the XDP object into the kernel")?;
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("the object has no program named `{XDP_PROGRAM_NAME}`"))?
        .try_into()?;
    program
        .load()
        .context("the kernel refused the XDP program")?;
    let mut interfaces = Vec::new();
    let mut fd_links: Vec<(String, FdLink)> = Vec::new();
    for iface in config.interface.to_vec() {
        let modes: &[AyaXdpMode] = match config.mode {
            XdpMode::Driver => &[AyaXdpMode::Driver],
            XdpMode::Skb => &[AyaXdpMode::Skb],
            XdpMode::Auto => &[AyaXdpMode::Driver, AyaXdpMode::Skb],
        };
        let mut last_error = None;
        for mode in modes {
            match program.attach(&iface, *mode) {
                Ok(link_id) => {
                    // Owned by us (and pinned below), so it can outlive this process.
                    let link = program.take_link(link_id)?;
                    let fd_link = FdLink::try_from(link).map_err(|e| {
                        anyhow!("the XDP link on `{iface}` is not a bpf_link, so it cannot be pinned: {e}")
                    })?;
                    fd_links.push((iface.clone(), fd_link));
                    interfaces.push((iface.clone(), *mode));
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(anyhow!(e).context(format!("cannot attach XDP to interface `{iface}`")));
        }
    }
    let log_stop = Arc::new(AtomicBool::new(false));
    let log_thread = start_log_forwarding(&mut ebpf, log_stop.clone());
    pin_maps(&ebpf, &config.pin_path)?;
    let mut links = Vec::new();
    for (iface, fd_link) in fd_links {
        let pin = link_pin(&config.pin_path, &iface);
        // A pin left by a gateway that was killed would make pinning fail.
        let _ = std::fs::remove_file(&pin);
        links.push(
            fd_link
                .pin(&pin)
                .with_context(|| format!("cannot pin the XDP link at {}", pin.display()))?,
        );
    }
    let mut guard = XdpGuard {
        adopted_maps: std::collections::HashMap::new(),
        ebpf: Some(ebpf),
        pin_path: config.pin_path.clone(),
        interfaces,
        links,
        keep_on_drop: false,
        log_stop,
        log_thread,
    };
    let mut budget: Array<_, LogBudget> = Array::try_from(guard.map_mut(MAP_LOG_BUDGET)?)?;
    budget.set(0, LogBudget::default(), 0)?;
    guard.apply(config, ports)?;
    Ok(guard)
}

/// Forwards the program's aya-log events (rate-limited in the kernel) to the gateway's log.
fn start_log_forwarding(ebpf: &mut Ebpf, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    let mut logger = match EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("XDP log events unavailable: {e}");
            return None;
        }
    };
    std::thread::Builder::new()
        .name("portcullis-xdplog".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                logger.flush();
                std::thread::sleep(LOG_POLL);
            }
            logger.flush();
        })
        .ok()
}

fn pin_maps(ebpf: &Ebpf, pin_path: &Path) -> anyhow::Result<()> {
    ensure_bpffs(pin_path)?;
    for name in PINNED_MAPS {
        let path = pin_path.join(name);
        // A pin left by a gateway that was killed would make pinning fail.
        let _ = std::fs::remove_file(&path);
        ebpf.map(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?
            .pin(&path)
            .with_context(|| format!("cannot pin map {name} at {}", path.display()))?;
    }
    Ok(())
}

/// The conventional bpffs mount point.
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// Makes sure `path` is a directory on a bpf filesystem, mounting one if needed: at
/// `/sys/fs/bpf` for paths below it (as systemd would have), else at `path` itself.
fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
    let conventional = Path::new(BPFFS_MOUNT_POINT);
    if path.starts_with(conventional)
        && conventional.is_dir()
        && !crate::sys::is_bpffs(conventional)?
    {
        crate::sys::mount_bpffs(conventional)
            .with_context(|| format!("cannot mount a bpf filesystem at {BPFFS_MOUNT_POINT}"))?;
        info!("mounted a bpf filesystem at {BPFFS_MOUNT_POINT}");
    }
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create the pin path {}", path.display()))?;
    if crate::sys::is_bpffs(path)? {
        return Ok(());
    }
    crate::sys::mount_bpffs(path).with_context(|| {
        format!(
            "{} is not on a bpf filesystem and mounting one there failed",
            path.display()
        )
    })?;
    info!(path = %path.display(), "mounted a bpf filesystem for the pinned maps");
    Ok(())
}
