//! The byte streams under HTTP/2: dialled TCP, TLS over TCP and Unix sockets on the proxy
//! side; accepted ones on the agent side, each holding its slot under the connection cap.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, watch};

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
/// dropped. Once the server is dropped (`killed`), every read and write fails, so the HTTP/2
/// connection task that owns it ends even though tonic spawned it on its own.
pub(crate) struct Accepted {
    io: BoxedIo,
    _slot: OwnedSemaphorePermit,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Accepted {
    pub(crate) fn new(io: BoxedIo, slot: OwnedSemaphorePermit, mut kill: watch::Receiver<bool>) -> Self {
        let killed = Box::pin(async move {
            let _ = kill.wait_for(|killed| *killed).await;
        });
        Self { io, _slot: slot, killed }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the server stopped"))
            }
            Poll::Pending => Ok(()),
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
        Pin::new(&mut self.io).poll_read(cx, buf)
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
