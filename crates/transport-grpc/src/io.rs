//! The byte streams under HTTP/2: dialled TCP, TLS over TCP and Unix sockets on the proxy
//! side; accepted ones on the agent side, each holding its slot under the connection cap.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::target::GrpcTarget;
use crate::tls::GrpcClientTls;

/// A byte stream of any of the kinds this crate carries HTTP/2 over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed byte stream.
pub(crate) type BoxedIo = Box<dyn Io>;

/// Dials `target`, with TLS when it is a `grpcs://` one (verified against `tls`).
pub(crate) async fn dial(target: &GrpcTarget, tls: Option<&GrpcClientTls>) -> std::io::Result<BoxedIo> {
    match target {
        GrpcTarget::Unix { path } => Ok(Box::new(UnixStream::connect(path).await?)),
        GrpcTarget::Plain { authority } => {
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp))
        }
        GrpcTarget::Tls { authority } => {
            let tls = tls.ok_or_else(|| std::io::Error::other("no TLS settings for a grpcs endpoint"))?;
            let host = target.host().unwrap_or_default();
            let name = tls.server_name(host).map_err(std::io::Error::other)?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tls.connector().connect(name, tcp).await?))
        }
    }
}

/// An accepted connection, holding its place under the server's connection cap until it is
/// dropped. Once the server is dropped (its [`KillSwitch`] thrown), every read and write fails, so the HTTP/2
/// connection task that owns it ends even though tonic spawned it on its own. A peer that
/// sends nothing within the first-byte deadline (the handshake time-out) is cut the same way:
/// hyper waits for the HTTP/2 preface without a time-out of its own.
pub(crate) struct Accepted {
    io: BoxedIo,
    _slot: OwnedSemaphorePermit,
    switch: Arc<KillSwitch>,
    /// Until the first byte arrives: the deadline, and what to do when it passes.
    first_byte: Option<(Pin<Box<tokio::time::Sleep>>, FirstByteTimedOut)>,
}

/// Called when a peer sent nothing before the first-byte deadline.
pub(crate) type FirstByteTimedOut = Box<dyn FnOnce() + Send>;

impl Accepted {
    pub(crate) fn new(
        io: BoxedIo,
        slot: OwnedSemaphorePermit,
        switches: &KillSwitches,
        (timeout, on_timeout): (std::time::Duration, FirstByteTimedOut),
    ) -> Self {
        let deadline = Box::pin(tokio::time::sleep(timeout));
        Self { io, _slot: slot, switch: switches.add(), first_byte: Some((deadline, on_timeout)) }
    }

    /// Fails once the server was dropped; otherwise arranges to be woken when it is.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        self.switch.waker.register(cx.waker());
        if self.switch.killed.load(Ordering::Acquire) {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the server stopped"));
        }
        Ok(())
    }
}

/// Cuts one accepted connection from outside: set, then its task is woken. Checked with an
/// atomic load on every read and write, so it costs no lock on the hot path.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The switches of a server's accepted connections, so that dropping the server cuts them all.
#[derive(Clone, Debug, Default)]
pub(crate) struct KillSwitches(Arc<Mutex<(bool, Vec<Weak<KillSwitch>>)>>);

impl KillSwitches {
    /// A switch for a new connection (already thrown if the server is gone).
    fn add(&self) -> Arc<KillSwitch> {
        let switch = Arc::new(KillSwitch::default());
        let mut state = self.0.lock();
        if state.0 {
            switch.kill();
        }
        state.1.retain(|s| s.strong_count() > 0);
        state.1.push(Arc::downgrade(&switch));
        switch
    }

    /// Cuts every connection, now and to come.
    pub(crate) fn kill_all(&self) {
        let switches = {
            let mut state = self.0.lock();
            state.0 = true;
            std::mem::take(&mut state.1)
        };
        for switch in switches.iter().filter_map(Weak::upgrade) {
            switch.kill();
        }
    }
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.first_byte.is_some() {
            if buf.filled().len() > filled {
                self.first_byte = None;
            } else if read.is_pending()
                && let Some((deadline, _)) = &mut self.first_byte
                && deadline.as_mut().poll(cx).is_ready()
            {
                if let Some((_, on_timeout)) = self.first_byte.take() {
                    on_timeout();
                }
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no byte from the peer within the handshake time-out",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
