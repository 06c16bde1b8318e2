//! The few raw system calls the gateway makes outside its libraries, each with its SAFETY
//! argument. Nothing else in the crate uses `unsafe`.

use std::{ffi::CString, net::Shutdown, os::fd::RawFd, path::Path};

/// Shuts down a socket by descriptor; errors (such as a descriptor already closed) are ignored,
/// since every caller only wants pending operations on it to finish.
pub fn shutdown_fd(fd: RawFd, how: Shutdown) {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) takes a plain integer and touches no memory of ours; on a descriptor
    // that is not a socket it fails with ENOTSOCK/EBADF, which we ignore.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// The bpffs magic number of statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// True when `path` lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st` is a valid, writable
    // statfs struct (all-zero is a valid bit pattern for it).
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem at `path`.
pub fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    let target =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data is null, which
    // mount(2) accepts for bpffs.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads, so ban expiries written
/// here compare correctly in the kernel.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What a pooled (idle) connection's socket holds when looked at without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleSocket {
    /// Nothing to read: still open and quiet, fit for reuse.
    Quiet,
    /// The peer closed its side (or the socket failed).
    Closed,
    /// The peer sent bytes nobody asked for: its framing can no longer be trusted.
    StrayBytes,
}

/// Peeks at an idle socket without blocking and without consuming anything.
pub fn peek_idle(fd: RawFd) -> IdleSocket {
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most 1 byte into `byte`, a valid, writable local; MSG_PEEK
    // leaves the data queued and MSG_DONTWAIT makes it return at once on a blocking socket.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => IdleSocket::Closed,
        n if n > 0 => IdleSocket::StrayBytes,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock => IdleSocket::Quiet,
            std::io::ErrorKind::Interrupted => IdleSocket::Quiet,
            _ => IdleSocket::Closed,
        },
    }
}

/// Appends what the socket `fd` holds now to `buf`, up to its spare capacity, without waiting:
/// `Ok(0)` is end of stream, `WouldBlock` that nothing is queued. `buf` must have spare capacity.
pub fn recv_ready(fd: RawFd, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv(2) writes at most `spare.len()` bytes into `spare`, memory `buf` owns and
    // does not use until its length covers it; MSG_DONTWAIT makes it return at once on a
    // blocking socket.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Sends as much of `parts`, in order, as the socket `fd` takes now, without waiting: how many
/// bytes went, or `WouldBlock` when its send buffer is full. A broken connection is `EPIPE` or
/// `ECONNRESET`, never a signal.
pub fn send_ready(fd: RawFd, parts: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
    // SAFETY: all-zero is a valid msghdr (no address, no control data, no iovecs).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` on Unix (its documented guarantee); sendmsg(2)
    // only reads through the pointer.
    msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = parts.len() as _;
    // SAFETY: `msg` points at `parts`, slices borrowed for the whole call, and sendmsg(2) reads
    // at most their lengths; MSG_DONTWAIT returns at once on a blocking socket and
    // MSG_NOSIGNAL reports a closed peer as EPIPE instead of raising SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Takes ownership of a descriptor that an accept operation returned.
pub fn stream_from_accepted(fd: RawFd) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is the result of a successful accept completion: a new, open socket that no
    // other object owns, so the stream becomes its only owner and closes it once.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}

/// Most descriptors one upgrade passes (the kernel's SCM_MAX_FD is 253).
const MAX_PASSED_FDS: usize = 253;

/// Sends `bytes` with the descriptors `fds` attached (SCM_RIGHTS) over a Unix stream socket.
pub fn send_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    if fds.len() > MAX_PASSED_FDS {
        return Err(std::io::Error::other("too many listening sockets to pass"));
    }
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(socket, &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one message with descriptors attached (SCM_RIGHTS): its bytes (up to the first
/// newline) and the listening sockets, which the caller then owns.
pub fn receive_fds(socket: RawFd) -> std::io::Result<(Vec<u8>, Vec<std::net::TcpListener>)> {
    use std::os::fd::FromRawFd;

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    // The header is sent alone, before anything else is written on the connection, and read
    // one byte at a time up to its newline, so no later line is consumed here.
    let mut header = Vec::new();
    let mut listeners = Vec::new();
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSED_FDS]);
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let msg = recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel installed `fd` in this process for this message; nothing
                    // else owns it, so the listener becomes its only owner.
                    listeners.push(unsafe { std::net::TcpListener::from_raw_fd(fd) });
                }
            }
        }
        if byte[0] == b'\n' {
            return Ok((header, listeners));
        }
        header.push(byte[0]);
    }
}

/// A new epoll instance (close-on-exec), owned by the caller.
pub fn epoll_create() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: epoll_create1(2) takes a flag and touches no memory of ours.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor this call created and nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Asks `epoll` to report, once, that `fd` has something to read (bytes, its end or an
/// error), tagged with `token`. A socket registered before (its one report since delivered)
/// is re-armed with the new token.
pub fn epoll_watch_once(epoll: RawFd, fd: RawFd, token: u64) -> std::io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
        u64: token,
    };
    // SAFETY: epoll_ctl(2) reads the one `epoll_event` we pass, a valid local, and keeps
    // nothing pointing into it.
    let added = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
    if added == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EEXIST) {
        return Err(error);
    }
    // SAFETY: as above.
    let modified = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, &mut event) };
    if modified == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tokens of the registrations `epoll` reports ready now, without waiting, into `tokens`
/// (cleared first; at most its capacity).
pub fn epoll_ready(epoll: RawFd, tokens: &mut Vec<u64>) -> std::io::Result<()> {
    const BATCH: usize = 64;
    tokens.clear();
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let room = tokens.capacity().clamp(1, BATCH);
    // SAFETY: epoll_wait(2) writes at most `room` (≤ BATCH) events into `events`, a valid,
    // writable local array of BATCH; a zero timeout makes it return at once.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), room as i32, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Copied out of the packed struct by value.
    tokens.extend(events[..n as usize].iter().map(|e| e.u64));
    Ok(())
}
