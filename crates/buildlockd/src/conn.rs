//! One client connection: peer check, handshake, requests in, replies (with descriptors) out.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use buildlock_proto::{ErrorCode, ErrorReply, FrameDecoder, ProtoError, Reply, Request, Welcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::server::Daemon;
use crate::state::Outgoing;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn handle(daemon: Arc<Daemon>, stream: UnixStream) {
    let me = std::process::id();
    let peer = stream.peer_cred();
    let (mut rd, mut wr) = stream.into_split();
    // Same user only. The runtime directory is private already; this is the second wall, and
    // it fails closed: a peer whose credentials cannot be read is refused.
    let uid = buildlock_sys::ipc::current_uid();
    let peer = match peer {
        Ok(cred) if cred.uid() == uid => cred,
        Ok(cred) => {
            tracing::warn!("refused a connection from uid {} (pid {:?})", cred.uid(), cred.pid());
            let msg = format!("buildlockd of uid {uid} serves only its own user, not uid {}", cred.uid());
            let _ = write(&mut wr, &Welcome::refused(me, msg)).await;
            return;
        }
        Err(e) => {
            tracing::warn!("refused a connection whose user cannot be read: {e}");
            let msg = format!("buildlockd of uid {uid} cannot tell which user you are ({e}), so it refuses you");
            let _ = write(&mut wr, &Welcome::refused(me, msg)).await;
            return;
        }
    };
    let mut decoder = FrameDecoder::new();
    // Requests are small; a frame larger than this arrives in several reads.
    let mut buf = vec![0u8; 4 * 1024];
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, next_frame(&mut rd, &mut decoder, &mut buf)).await {
        Ok(Ok(Some(frame))) => buildlock_proto::check_hello(&frame),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!("dropped a connection before its hello: {e}");
            let _ = write(&mut wr, &Welcome::refused(me, e.to_string())).await;
            return;
        }
        Err(_) => {
            tracing::info!("dropped a connection that sent no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("refused a client: {e}");
            let _ = write(&mut wr, &Welcome::refused(me, e.to_string())).await;
            return;
        }
    };
    if write(&mut wr, &Welcome::new(me)).await.is_err() {
        return;
    }
    let client_pid = peer.pid().map(|p| p as u32).unwrap_or(hello.pid);
    let (tx, rx) = mpsc::unbounded_channel();
    let owner = daemon.register(tx.clone(), client_pid);
    let mut writer = tokio::spawn(write_loop(wr, rx));
    // The writer ends early only when a reply cannot be sent (the client shut its side, or the
    // socket broke): the connection is over then, and what it held is released, even if the
    // client still sends.
    let mut writer_done = false;
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut writer => {
                writer_done = true;
                tracing::info!("closing connection of pid {client_pid}: a reply could not be sent to it");
                break;
            }
            frame = next_frame(&mut rd, &mut decoder, &mut buf) => frame,
        };
        match frame {
            Ok(Some(frame)) => match buildlock_proto::decode::<Request>(&frame) {
                Ok(req) => daemon.handle(owner, req),
                Err(e) => {
                    tracing::warn!("closing connection of pid {client_pid}: {e}");
                    let _ = tx.send(reply_error(ErrorCode::Malformed, &e));
                    break;
                }
            },
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("closing connection of pid {client_pid}: {e}");
                let code = match e {
                    ProtoError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::Malformed,
                };
                let _ = tx.send(reply_error(code, &e));
                break;
            }
        }
    }
    drop(tx);
    drop(rd);
    daemon.disconnected(owner);
    // The writer drains what is queued (a last error, say), then the socket closes.
    if !writer_done {
        let _ = writer.await;
    }
}

fn reply_error(code: ErrorCode, e: &dyn std::fmt::Display) -> Outgoing {
    Outgoing { reply: Reply::Error(ErrorReply { code, message: e.to_string(), holder: None, lease: 0 }), fd: None }
}

/// The next whole frame, `None` at a clean end of stream.
async fn next_frame(
    rd: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<Vec<u8>>, ProtoError> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        let n = rd.read(buf).await.map_err(ProtoError::Io)?;
        if n == 0 {
            return if decoder.buffered() == 0 { Ok(None) } else { Err(ProtoError::Truncated) };
        }
        decoder.push(&buf[..n]);
    }
}

async fn write<T: serde::Serialize>(wr: &mut OwnedWriteHalf, msg: &T) -> io::Result<()> {
    let bytes = buildlock_proto::encode(msg).map_err(io::Error::other)?;
    wr.write_all(&bytes).await
}

/// Sends queued replies in order; a descriptor rides on the first byte of its reply's frame.
async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let bytes = match buildlock_proto::encode(&out.reply) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot encode a reply: {e}");
                continue;
            }
        };
        let result = match out.fd {
            Some(fd) => send_with_fd(&wr, &bytes, &fd).await.map(|sent| bytes[sent..].to_vec()),
            None => Ok(bytes),
        };
        match result {
            Ok(rest) => {
                if wr.write_all(&rest).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::info!("cannot send to a client: {e}");
                return;
            }
        }
    }
}

async fn send_with_fd(wr: &OwnedWriteHalf, bytes: &[u8], fd: &crate::state::SendFd) -> io::Result<usize> {
    let stream: &UnixStream = wr.as_ref();
    loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            buildlock_sys::ipc::send_with_fd(stream.as_fd(), bytes, Some(fd.as_fd()))
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}
