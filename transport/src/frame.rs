//! Frames over quinn streams: [`FrameReader`] reads them, [`write_message`] writes them.
//!
//! `FrameReader` buffers only what one frame needs (its length is checked against
//! `MAX_FRAME_BYTES` first) and gives a started frame `frame_timeout` to arrive completely, so
//! a peer cannot hold a half-sent frame open for ever. `next()` is cancel-safe: all state lives
//! in the struct, so it can sit in a `select!`.
//!
//! A reader may be given memory budgets (semaphores counting bytes): before buffering a
//! frame's body it takes the frame's length from each, and the returned `Frame` holds them
//! until it is dropped. QUIC flow control alone cannot bound this memory, because reading
//! from quinn returns credit to the peer; the budgets do, and while a budget is exhausted the
//! stream simply is not read, so flow control pushes back on the sender.

use std::time::Duration;

use std::sync::Arc;

use bytes::BytesMut;
use quiver_protocol::frame::{decode_frame, FrameError, RawFrame};
use quiver_protocol::limits::{MAX_FRAME_BYTES, UNBUDGETED_FRAME_BYTES};
use quiver_protocol::message::{Encoded, Message, MessageError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default for how long the rest of a frame may take once its first byte arrived.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked of quinn per read.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("a frame took longer than {0:?} to arrive")]
    Timeout(Duration),
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
}

/// Writing a frame failed.
pub type WriteError = quinn::WriteError;

/// A frame with the memory-budget permits that cover it.
#[derive(Debug)]
pub struct Frame {
    /// The frame as read: kind and payload.
    pub raw: RawFrame,
    /// Held until the frame's memory is released (dropping returns the bytes to the budgets).
    pub permits: Vec<OwnedSemaphorePermit>,
}

/// Reads frames from one quinn receive stream; see the module documentation.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    frame_timeout: Duration,
    budgets: Vec<Arc<Semaphore>>,
    /// Permits taken for the frame being buffered.
    held: Vec<OwnedSemaphorePermit>,
    /// When the frame being buffered must be complete (set at its first byte).
    deadline: Option<tokio::time::Instant>,
}

impl FrameReader {
    /// A reader with the default frame timeout and no budgets.
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            // Allocated as bytes arrive: an idle stream holds no buffer.
            buf: BytesMut::new(),
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            budgets: Vec::new(),
            held: Vec::new(),
            deadline: None,
        }
    }

    /// How long the rest of a frame may take once its first byte arrived.
    pub fn with_frame_timeout(mut self, t: Duration) -> Self {
        self.frame_timeout = t;
        self
    }

    /// Adds a memory budget in bytes (at least `MAX_FRAME_BYTES` permits, or large frames
    /// would wait for ever).
    pub fn with_budget(mut self, budget: Arc<Semaphore>) -> Self {
        self.budgets.push(budget);
        self
    }

    /// The next raw frame, or `None` at a clean end of stream.
    pub async fn next_raw(&mut self) -> Result<Option<RawFrame>, ReadError> {
        Ok(self.next_frame().await?.map(|f| f.raw))
    }

    /// The next frame with its budget permits, or `None` at a clean end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            self.reserve_budget().await?;
            // Once the length is known (and checked), `decode_frame` reserves room for the
            // whole frame, so the buffer never grows by doubling and copying what it holds.
            if let Some(raw) = decode_frame(&mut self.buf)? {
                self.deadline = None;
                if raw.payload.len() > UNBUDGETED_FRAME_BYTES as usize {
                    // Leave a large frame sole owner of its buffer (the few bytes read past it
                    // move to a new one), so a receiver can take it back as `BytesMut` and
                    // modify it in place, as the broker does when it stamps offsets.
                    self.buf = BytesMut::from(&self.buf[..]);
                }
                return Ok(Some(Frame { raw, permits: std::mem::take(&mut self.held) }));
            }
            let chunk = if self.buf.is_empty() {
                self.recv.read_chunk(READ_CHUNK_BYTES, true).await?
            } else {
                // One deadline for the whole frame, from its first byte: trickling a byte at a
                // time does not extend it.
                let deadline =
                    *self.deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.frame_timeout);
                tokio::time::timeout_at(deadline, self.recv.read_chunk(READ_CHUNK_BYTES, true))
                    .await
                    .map_err(|_| ReadError::Timeout(self.frame_timeout))??
            };
            match chunk {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(ReadError::Truncated),
            }
        }
    }

    /// Once a frame's length is known, takes that many bytes from every budget (waiting, and
    /// so not reading the stream, while a budget is exhausted).
    async fn reserve_budget(&mut self) -> Result<(), ReadError> {
        if self.held.len() == self.budgets.len() || self.buf.len() < 4 {
            return Ok(());
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len as usize > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len as u64).into());
        }
        if len <= UNBUDGETED_FRAME_BYTES {
            return Ok(());
        }
        // One budget at a time, recording each permit as it is taken, so a cancelled call
        // resumes where it stopped.
        while self.held.len() < self.budgets.len() {
            let budget = self.budgets[self.held.len()].clone();
            let permit = budget.acquire_many_owned(len.max(1)).await.map_err(|_| ReadError::Truncated)?;
            self.held.push(permit);
        }
        Ok(())
    }

    /// The next frame decoded as a `Message`, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, ReadError> {
        match self.next_raw().await? {
            Some(raw) => Ok(Some(Message::decode(raw)?)),
            None => Ok(None),
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes one message; the batch tail goes out without being copied.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), WriteError> {
    write_encoded(send, msg.encode()).await
}

/// Writes one encoded message: its head, then its tail (a batch) without copying it.
pub async fn write_encoded(send: &mut quinn::SendStream, enc: Encoded) -> Result<(), WriteError> {
    if enc.tail.is_empty() {
        send.write_chunk(enc.head).await
    } else {
        send.write_all_chunks(&mut [enc.head, enc.tail]).await
    }
}
