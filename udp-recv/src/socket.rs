//! Batched UDP I/O: `recvmmsg` for the receiver, `sendmmsg` (optionally with UDP GSO) for the
//! simulator. This is the only module of the crate with `unsafe`: the two syscalls and the
//! setsockopt calls socket2 does not wrap.
//!
//! Never allocates per call: the header arrays are sized once and re-pointed at the batch buffers.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Room for any datagram up to a 9000-byte jumbo frame; longer ones arrive truncated and are
/// rejected by the size check like any other wrong-size packet.
pub const MAX_DATAGRAM: usize = 9216;

/// A batch of received datagrams in one contiguous buffer.
#[derive(Debug)]
pub struct PacketBatch {
    buf: Vec<u8>,
    lens: Vec<usize>,
    n: usize,
}

impl PacketBatch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        PacketBatch {
            buf: vec![0; capacity * MAX_DATAGRAM],
            lens: vec![0; capacity],
            n: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i` (< len()).
    pub fn packet(&self, i: usize) -> &[u8] {
        let start = i * MAX_DATAGRAM;
        &self.buf[start..start + self.lens[i]]
    }

    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Appends a datagram (tests and replay); longer ones are truncated as the kernel would.
    /// Returns false when the batch is full.
    pub fn push(&mut self, datagram: &[u8]) -> bool {
        if self.n == self.capacity() {
            return false;
        }
        let len = datagram.len().min(MAX_DATAGRAM);
        let start = self.n * MAX_DATAGRAM;
        self.buf[start..start + len].copy_from_slice(&datagram[..len]);
        self.lens[self.n] = len;
        self.n += 1;
        true
    }
}

/// What one receive call produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// The batch holds this many datagrams (at least one).
    Packets(usize),
    /// Nothing arrived within the socket's receive timeout.
    Timeout,
    /// The source has ended (test and replay sources; a socket never closes).
    Closed,
}

/// Where a receiver gets its packets: a UDP socket in production, a vector in tests.
pub trait PacketSource {
    fn recv_batch(&mut self, batch: &mut PacketBatch) -> io::Result<Recv>;
}

/// What the kernel granted for the receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct RcvBufReport {
    pub requested: usize,
    /// As reported by getsockopt (Linux reports twice the usable size).
    pub effective: usize,
    pub rmem_max: Option<usize>,
}

impl RcvBufReport {
    /// True when the kernel gave less than asked (the operator should raise net.core.rmem_max).
    pub fn clamped(&self) -> bool {
        self.effective < self.requested
    }
}

/// A bound UDP socket read with `recvmmsg`.
#[derive(Debug)]
pub struct UdpReceiver {
    socket: Socket,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
}

fn read_rmem_max() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl UdpReceiver {
    /// Binds `addr` with a receive buffer of `rcvbuf` bytes and a receive timeout (the longest a
    /// `recv_batch` waits when nothing arrives).
    pub fn bind(
        addr: SocketAddr,
        rcvbuf: usize,
        timeout: Duration,
        batch_capacity: usize,
    ) -> io::Result<(Self, RcvBufReport)> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        let _ = socket.set_recv_buffer_size(rcvbuf);
        if socket.recv_buffer_size()? < rcvbuf {
            // As root, SO_RCVBUFFORCE goes past net.core.rmem_max.
            let value = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
            // SAFETY: the fd is a valid open socket owned by `socket`; the option value points to
            // a live c_int and its exact size is passed.
            let _ = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        let report = RcvBufReport {
            requested: rcvbuf,
            effective: socket.recv_buffer_size()?,
            rmem_max: read_rmem_max(),
        };
        socket.set_read_timeout(Some(timeout.max(Duration::from_micros(100))))?;
        socket.bind(&SockAddr::from(addr))?;
        let capacity = batch_capacity.max(1);
        // SAFETY: mmsghdr and iovec are plain C structs for which all-zero bytes are valid
        // (null pointers, zero lengths); they are re-pointed before every use.
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Ok((
            UdpReceiver {
                socket,
                headers: vec![zero_hdr; capacity],
                iovecs: vec![zero_iov; capacity],
            },
            report,
        ))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }
}

impl PacketSource for UdpReceiver {
    fn recv_batch(&mut self, batch: &mut PacketBatch) -> io::Result<Recv> {
        let n = self.headers.len().min(batch.capacity());
        let base = batch.buf.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < capacity, so the datagram slot [i*MAX_DATAGRAM, (i+1)*MAX_DATAGRAM) lies
            // inside `batch.buf`, which outlives the syscall below and is not otherwise borrowed.
            self.iovecs[i].iov_base = unsafe { base.add(i * MAX_DATAGRAM) }.cast();
            self.iovecs[i].iov_len = MAX_DATAGRAM;
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_name = std::ptr::null_mut();
            hdr.msg_namelen = 0;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        // SAFETY: `headers[..n]` are initialised and point at `iovecs[..n]`, which point at
        // disjoint MAX_DATAGRAM-byte regions of `batch.buf`; all stay alive and unaliased for the
        // duration of the call. The kernel writes at most iov_len bytes per message.
        let got = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {
                    batch.n = 0;
                    Ok(Recv::Timeout)
                }
                _ => Err(err),
            };
        }
        let got = got as usize;
        for i in 0..got {
            batch.lens[i] = (self.headers[i].msg_len as usize).min(MAX_DATAGRAM);
        }
        batch.n = got;
        Ok(if got == 0 {
            Recv::Timeout
        } else {
            Recv::Packets(got)
        })
    }
}

/// One datagram (or, with GSO, a run of equal-size datagrams) to send: gathered from `parts`.
#[derive(Debug)]
pub struct OutMessage<'a> {
    pub dest: &'a SockAddr,
    pub parts: &'a [io::IoSlice<'a>],
}

/// A UDP socket that sends batches with `sendmmsg`; with GSO each message may carry several
/// datagrams of `segment` bytes that the kernel splits.
#[derive(Debug)]
pub struct UdpSender {
    socket: Socket,
    headers: Vec<libc::mmsghdr>,
}

/// Most datagrams the kernel accepts in one GSO message.
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload one GSO message may carry.
pub const GSO_MAX_BYTES: usize = 65_507;

impl UdpSender {
    /// A sender bound to an ephemeral port on `bind_ip`; `gso_segment` enables UDP GSO.
    pub fn new(bind: SocketAddr, sndbuf: usize, gso_segment: Option<u16>) -> io::Result<Self> {
        let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
        let _ = socket.set_send_buffer_size(sndbuf);
        socket.bind(&SockAddr::from(bind))?;
        if let Some(segment) = gso_segment {
            let value = libc::c_int::from(segment);
            // SAFETY: valid socket fd; the option value is a live c_int of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(UdpSender {
            socket,
            headers: Vec::new(),
        })
    }

    /// Sends every message, retrying on a full send buffer. Returns the number of messages sent.
    pub fn send_all(&mut self, messages: &[OutMessage<'_>]) -> io::Result<usize> {
        if self.headers.len() < messages.len() {
            // SAFETY: all-zero mmsghdr is valid (null pointers, zero lengths); filled below.
            let zero: libc::mmsghdr = unsafe { std::mem::zeroed() };
            self.headers.resize(messages.len(), zero);
        }
        for (hdr, msg) in self.headers.iter_mut().zip(messages) {
            hdr.msg_hdr.msg_name = msg.dest.as_ptr() as *mut libc::c_void;
            hdr.msg_hdr.msg_namelen = msg.dest.len();
            // IoSlice is guaranteed ABI-compatible with iovec on Unix; the kernel only reads it.
            hdr.msg_hdr.msg_iov = msg.parts.as_ptr() as *mut libc::iovec;
            hdr.msg_hdr.msg_iovlen = msg.parts.len();
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let mut sent = 0;
        while sent < messages.len() {
            let remaining = &mut self.headers[sent..messages.len()];
            // SAFETY: each header points at a live SockAddr and a live slice of IoSlice (which is
            // ABI-compatible with iovec) borrowed from `messages` for the duration of the call;
            // the kernel only reads the pointed-to memory.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    remaining.as_mut_ptr(),
                    remaining.len() as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    // ENOBUFS on a full loopback queue: let the receiver catch up.
                    _ if err.raw_os_error() == Some(libc::ENOBUFS) => {
                        std::thread::yield_now();
                        continue;
                    }
                    _ => return Err(err),
                }
            }
            sent += rc as usize;
        }
        Ok(sent)
    }
}

/// Pins the calling thread to one CPU (operators pin each receiver to its own core).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty set; CPU_SET only
    // writes inside it (cpu < CPU_SETSIZE was checked); sched_setaffinity(0, ..) applies to the
    // calling thread and only reads the set for the size given.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time the calling thread has used, from /proc/thread-self/schedstat (nanoseconds).
pub fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}
