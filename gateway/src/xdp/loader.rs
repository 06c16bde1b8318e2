//! Loads the XDP program, attaches it to the configured interfaces, syncs the port map and
//! pins the maps under `pin_path`. Detaches and unpins on drop.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use aya::{
    maps::HashMap,
    programs::{Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfLoader,
};
use portcullis_common::{MAP_PORTS, MAP_SOURCE_PACKETS, PINNED_MAPS, XDP_PROGRAM_NAME};
use tracing::info;

use crate::config::{XdpConfig, XdpMode};

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

/// A loaded and attached program. Dropping it detaches the program and removes the pins.
pub struct XdpGuard {
    ebpf: Ebpf,
    pin_path: PathBuf,
    interfaces: Vec<(String, AyaXdpMode)>,
}

impl XdpGuard {
    /// Interfaces the program is attached to, with the mode that worked.
    pub fn interfaces(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.interfaces
            .iter()
            .map(|(i, m)| (i.as_str(), mode_name(*m)))
    }

    /// Replaces the protected ports, without detaching the program.
    pub fn sync_ports(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let mut map: HashMap<_, u16, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_PORTS)
                .ok_or_else(|| anyhow!("map {MAP_PORTS} missing"))?,
        )?;
        let stale: Vec<u16> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !ports.contains(p))
            .collect();
        for port in stale {
            map.remove(&port)?;
        }
        for port in ports {
            map.insert(port, 1, 0)?;
        }
        Ok(())
    }
}

impl Drop for XdpGuard {
    fn drop(&mut self) {
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(self.pin_path.join(name));
        }
        // Dropping `ebpf` detaches the links it owns.
        info!(pin_path = %self.pin_path.display(), "XDP program detached");
    }
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
        .map_max_entries(MAP_SOURCE_PACKETS, config.max_sources)
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
    for iface in config.interface.to_vec() {
        let modes: &[AyaXdpMode] = match config.mode {
            XdpMode::Driver => &[AyaXdpMode::Driver],
            XdpMode::Skb => &[AyaXdpMode::Skb],
            XdpMode::Auto => &[AyaXdpMode::Driver, AyaXdpMode::Skb],
        };
        let mut last_error = None;
        for mode in modes {
            match program.attach(&iface, *mode) {
                Ok(_) => {
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
    let mut guard = XdpGuard {
        ebpf,
        pin_path: config.pin_path.clone(),
        interfaces,
    };
    guard.sync_ports(ports)?;
    pin_maps(&guard.ebpf, &guard.pin_path)?;
    Ok(guard)
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

/// Makes sure `path` is a directory on a bpf filesystem, mounting one there if needed.
fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
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
