//! Stdin and stdout on the peer's own thread, when they are pipes or sockets.
//!
//! A line's shortest path through a peer is three wake-ups: stdin readable, the socket, stdout
//! written. Tokio's stdin reads on a thread of its own and hands each read over, and a stdout
//! thread would take one more hand-over; on a pipe or a socket (a lab, a container, a program
//! driving the peer) both can instead be made non-blocking and served by the runtime's own
//! poller. On a terminal or a file they stay blocking (a terminal is shared with the shell, whose
//! file description must not be left non-blocking), and the callers fall back to a thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};

/// Whether `fd` is a pipe or a socket (which can safely be made non-blocking).
fn is_pipe_or_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed struct we pass; any fd value is safe to ask about.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
}

/// A duplicate of `fd`, non-blocking, registered with the runtime's poller; None unless `fd` is
/// a pipe or a socket.
fn nonblocking(fd: RawFd) -> Option<AsyncFd<OwnedFd>> {
    if !is_pipe_or_socket(fd) {
        return None;
    }
    // SAFETY: dup returns a new descriptor we own, or -1.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` was just returned by the kernel and is owned by no one else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own. (The flag belongs to the open file
    // description, shared with `fd`: this process does not read `fd` blocking afterwards.)
    unsafe {
        let flags = libc::fcntl(dup, libc::F_GETFL);
        if flags < 0 || libc::fcntl(dup, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return None;
        }
    }
    // SAFETY: `owned` is a valid, open descriptor, and as the AsyncFd owns it, it stays open and
    // the same until the AsyncFd is dropped.
    unsafe { AsyncFd::register(owned) }.ok()
}

/// Stdin, read on the runtime's thread.
pub struct Stdin(AsyncFd<OwnedFd>);

impl Stdin {
    /// Stdin, if it is a pipe or a socket.
    pub fn nonblocking() -> Option<Stdin> {
        nonblocking(libc::STDIN_FILENO).map(Stdin)
    }
}

impl AsyncRead for Stdin {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: read(2) into the initialised, unfilled part of the caller's buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Stdout, written on the runtime's thread without ever blocking it.
pub struct Stdout(AsyncFd<OwnedFd>);

/// write(2) of `bytes` to `fd`.
fn raw_write(fd: &OwnedFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: write(2) from a buffer we hold, on a descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

impl Stdout {
    /// Stdout, if it is a pipe or a socket.
    pub fn nonblocking() -> Option<Stdout> {
        nonblocking(libc::STDOUT_FILENO).map(Stdout)
    }

    /// Writes what it can of `bytes` now: how many bytes went out (0 when stdout is full).
    pub fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match raw_write(self.0.get_ref(), bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }

    /// Writes some of `bytes`, waiting until stdout takes at least one.
    pub async fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.writable().await?;
            // Readiness is cleared only when this very write finds stdout full: a wake-up in
            // between is never lost.
            match guard.try_io(|fd| raw_write(fd.get_ref(), bytes)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `bytes`, blocking this thread while stdout is full (for a peer with a
    /// state directory, which must print before it records a line as shown).
    pub fn write_all_blocking(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.try_write(bytes)? {
                0 => {
                    let mut poll = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: poll(2) on one pollfd we own, waiting without a time limit.
                    unsafe { libc::poll(&mut poll, 1, -1) };
                }
                n => bytes = &bytes[n..],
            }
        }
        Ok(())
    }
}
