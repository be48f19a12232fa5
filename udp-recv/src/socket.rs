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

/// Room for any datagram up to a 9000-byte jumbo frame; the part of a datagram beyond its
/// header and payload lands in a discard area, so oversize datagrams are seen by their length.
pub const MAX_DATAGRAM: usize = 9216;
/// Room per datagram for its header (every format's header is at most this long).
pub const HEADER_STRIDE: usize = 64;

/// The headers and lengths of one scatter receive. Payloads went straight to the caller's
/// destination (in production: the FrameBuffer slot).
#[derive(Debug)]
pub struct ScatterBatch {
    headers: Vec<u8>,
    lens: Vec<usize>,
    n: usize,
}

impl ScatterBatch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ScatterBatch {
            headers: vec![0; capacity * HEADER_STRIDE],
            lens: vec![0; capacity],
            n: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Datagrams received by the last call.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Full length of datagram `i` as it was on the wire (possibly more than was kept).
    pub fn datagram_len(&self, i: usize) -> usize {
        self.lens[i]
    }

    /// The header bytes of datagram `i` (HEADER_STRIDE bytes; only the first `header_len` that
    /// the receive was asked for are meaningful, and only as far as the datagram reached).
    pub fn header(&self, i: usize) -> &[u8] {
        &self.headers[i * HEADER_STRIDE..(i + 1) * HEADER_STRIDE]
    }

    /// Scatters one datagram as the kernel would (sources other than sockets, and tests).
    pub fn scatter(&mut self, i: usize, datagram: &[u8], header_len: usize, payload: &mut [u8]) {
        let h = datagram.len().min(header_len);
        self.headers[i * HEADER_STRIDE..i * HEADER_STRIDE + h].copy_from_slice(&datagram[..h]);
        let rest = &datagram[h..];
        let p = rest.len().min(payload.len());
        payload[..p].copy_from_slice(&rest[..p]);
        self.lens[i] = datagram.len();
    }

    /// Sets how many datagrams the batch holds (after `scatter`).
    pub fn set_len(&mut self, n: usize) {
        self.n = n.min(self.capacity());
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
    /// Receives up to `min(batch.capacity(), dest.len() / payload_len)` datagrams. Datagram i's
    /// first `header_len` bytes go to `batch.header(i)`, the next `payload_len` bytes to
    /// `dest[i * payload_len..]`, the rest nowhere (its full length is still reported).
    fn recv_scatter(
        &mut self,
        batch: &mut ScatterBatch,
        header_len: usize,
        dest: &mut [u8],
        payload_len: usize,
    ) -> io::Result<Recv>;
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

/// A bound UDP socket read with `recvmmsg`, scattering each datagram into header, payload and
/// discard buffers.
#[derive(Debug)]
pub struct UdpReceiver {
    socket: Socket,
    headers: Vec<libc::mmsghdr>,
    /// Three per message: header, payload, discard.
    iovecs: Vec<libc::iovec>,
    discard: Vec<u8>,
}

fn read_rmem_max() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Datagrams the kernel dropped for the UDP socket bound to `port` (the `drops` column of
/// /proc/net/udp and /proc/net/udp6), or None when it cannot be read.
pub fn kernel_drops(port: u16) -> Option<u64> {
    let mut total = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                let drops: u64 = cols.last().and_then(|d| d.parse().ok()).unwrap_or(0);
                total = Some(total.unwrap_or(0) + drops);
            }
        }
    }
    total
}

impl UdpReceiver {
    /// Binds `addr` with a receive buffer of `rcvbuf` bytes and a receive timeout (the longest a
    /// receive waits when nothing arrives).
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
        // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are valid (null pointers,
        // zero lengths); every field used is set before each call.
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Ok((
            UdpReceiver {
                socket,
                headers: vec![zero_hdr; capacity],
                iovecs: vec![zero_iov; 3 * capacity],
                discard: vec![0; MAX_DATAGRAM],
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
    fn recv_scatter(
        &mut self,
        batch: &mut ScatterBatch,
        header_len: usize,
        dest: &mut [u8],
        payload_len: usize,
    ) -> io::Result<Recv> {
        let header_len = header_len.min(HEADER_STRIDE);
        let n = self
            .headers
            .len()
            .min(batch.capacity())
            .min(dest.len() / payload_len.max(1));
        if n == 0 {
            batch.n = 0;
            return Ok(Recv::Timeout);
        }
        let header_base = batch.headers.as_mut_ptr();
        let dest_base = dest.as_mut_ptr();
        let discard = self.discard.as_mut_ptr();
        for i in 0..n {
            let iov = &mut self.iovecs[3 * i..3 * i + 3];
            // SAFETY: i < batch.capacity(), so [i*HEADER_STRIDE, i*HEADER_STRIDE+header_len) lies
            // inside batch.headers; i < dest.len()/payload_len, so [i*payload_len, (i+1)*payload_len)
            // lies inside `dest`. Both buffers outlive the syscall below and are not otherwise
            // borrowed during it; the regions of different messages are disjoint.
            unsafe {
                iov[0].iov_base = header_base.add(i * HEADER_STRIDE).cast();
                iov[1].iov_base = dest_base.add(i * payload_len).cast();
            }
            iov[0].iov_len = header_len;
            iov[1].iov_len = payload_len;
            // Every message shares the discard area: its content is never read.
            iov[2].iov_base = discard.cast();
            iov[2].iov_len = MAX_DATAGRAM;
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_iov = iov.as_mut_ptr();
            hdr.msg_iovlen = 3;
            hdr.msg_name = std::ptr::null_mut();
            hdr.msg_namelen = 0;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        // SAFETY: `headers[..n]` are initialised and point at 3 iovecs each in `iovecs`, which
        // point at the header, payload and discard regions described above; all stay alive and
        // unaliased for the duration of the call. The kernel writes at most iov_len bytes each.
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
            batch.n = 0;
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(Recv::Timeout),
                _ => Err(err),
            };
        }
        let got = got as usize;
        for i in 0..got {
            // msg_len counts the bytes kept, which for anything up to the discard area's end is
            // the datagram's length; MSG_TRUNC in msg_flags marks the rare longer one.
            let kept = self.headers[i].msg_len as usize;
            let truncated = self.headers[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.lens[i] = if truncated { kept + 1 } else { kept };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn kernel_drops_are_read_for_our_port() {
        // A tiny receive buffer that nobody reads: loopback delivers in the sender's context, so
        // all but the first datagram or two are dropped before send_to returns.
        let (rx, _) = UdpReceiver::bind(
            "127.0.0.1:0".parse().unwrap(),
            1,
            Duration::from_millis(1),
            4,
        )
        .unwrap();
        let port = rx.local_addr().unwrap().port();
        let before = kernel_drops(port).expect("our socket is listed in /proc/net/udp");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..50 {
            tx.send_to(&[0u8; 8240], ("127.0.0.1", port)).unwrap();
        }
        let after = kernel_drops(port).unwrap();
        assert!(after - before >= 40, "drops before {before}, after {after}");
    }

    #[test]
    fn scatter_receive_splits_header_payload_and_reports_true_length() {
        let (mut rx, _) = UdpReceiver::bind(
            "127.0.0.1:0".parse().unwrap(),
            1 << 20,
            Duration::from_millis(50),
            4,
        )
        .unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let exact: Vec<u8> = (0..20u8).collect();
        let long = vec![7u8; 9500];
        tx.send_to(&exact, ("127.0.0.1", port)).unwrap();
        tx.send_to(&long, ("127.0.0.1", port)).unwrap();
        let mut batch = ScatterBatch::new(4);
        let mut dest = [0u8; 2 * 12];
        let mut got = 0;
        while got < 2 {
            if let Recv::Packets(k) = rx
                .recv_scatter(&mut batch, 8, &mut dest[got * 12..], 12)
                .unwrap()
            {
                for i in 0..k {
                    let n = got + i;
                    if n == 0 {
                        assert_eq!(batch.datagram_len(i), 20);
                        assert_eq!(&batch.header(i)[..8], &exact[..8]);
                    } else {
                        // Longer than header + payload + discard area: flagged as over-long.
                        assert!(batch.datagram_len(i) > 8 + 12);
                    }
                }
                got += k;
            }
        }
        assert_eq!(&dest[..12], &exact[8..]);
        assert_eq!(&dest[12..], &[7u8; 12]);
    }
}
