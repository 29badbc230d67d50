//! A socket with a read buffer that yields whole messages. Reading is
//! cancel-safe (bytes stay in the buffer until a frame is complete), so a
//! session can `select!` over its client and its server.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, Frame, FrameError};

/// Any byte stream a client may arrive on (TCP, or TLS over TCP).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Conn<S> {
    pub io: S,
    pub buf: BytesMut,
    /// Largest message accepted from the peer.
    pub max: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed")]
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S, max: usize) -> Self {
        Conn {
            io,
            buf: BytesMut::with_capacity(8192),
            max,
        }
    }

    /// A complete message already buffered, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        codec::split_frame(&mut self.buf, self.max)
    }

    /// Reads more bytes; `Closed` at end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> Result<(), ConnError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        match self.io.read_buf(&mut self.buf).await? {
            0 => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    /// The next message, reading as needed.
    pub async fn next_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }
}
