//! The ring algorithms over host buffers, on the `Links` of one rank: all-reduce (reduce-scatter
//! then all-gather), all-gather of variable-length blocks, broadcast. Each step of all-reduce and
//! all-gather writes to the right on a scoped thread while the calling thread reads from the left.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use super::error::CommError;
use super::frame::{FrameHeader, OpCode};
use super::link::{Link, Links};
use super::tcp::Element;

/// Payloads are read (and broadcasts forwarded) in pieces of this size.
pub(super) const PIECE_BYTES: usize = 256 * 1024;

/// Range of chunk `i` when `len` elements are split into `parts` near-equal chunks (the first
/// `len % parts` chunks hold one element more).
pub fn chunk_range(len: usize, parts: usize, i: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Borrows two disjoint ranges of `buf`, the first shared and the second mutable.
pub(super) fn split_pair<T>(buf: &mut [T], shared: Range<usize>, exclusive: Range<usize>) -> (&[T], &mut [T]) {
    if shared.end <= exclusive.start {
        let (head, tail) = buf.split_at_mut(exclusive.start);
        (&head[shared], &mut tail[..exclusive.len()])
    } else {
        debug_assert!(exclusive.end <= shared.start, "ranges overlap");
        let (head, tail) = buf.split_at_mut(shared.start);
        (&tail[..shared.len()], &mut head[exclusive])
    }
}

/// One ring step: `send` (to the right) runs on a scoped thread while `recv` (from the left) runs on
/// the caller's. The first side to fail shuts both sockets down, which unblocks the other side; its
/// error is the one returned.
fn exchange<R>(
    links: &Links,
    send: impl FnOnce() -> Result<(), CommError> + Send,
    recv: impl FnOnce() -> Result<R, CommError>,
) -> Result<R, CommError> {
    const NONE: u8 = 0;
    const SEND: u8 = 1;
    const RECV: u8 = 2;
    let first_failure = AtomicU8::new(NONE);
    let record_failure = |side: u8| {
        if first_failure.compare_exchange(NONE, side, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            links.shutdown();
        }
    };
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let sent = send();
            if sent.is_err() {
                record_failure(SEND);
            }
            sent
        });
        let received = recv();
        if received.is_err() {
            record_failure(RECV);
        }
        let sent = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (sent, received) {
            (Ok(()), received) => received,
            (Err(e), Ok(_)) => Err(e),
            (Err(send_error), Err(recv_error)) => {
                if first_failure.load(Ordering::Acquire) == SEND {
                    Err(send_error)
                } else {
                    Err(recv_error)
                }
            }
        }
    })
}

pub(super) fn ring_all_reduce<T: Element>(
    links: &Links,
    op: &'static str,
    rank: usize,
    world: usize,
    seq: u64,
    buf: &mut [T],
) -> Result<(), CommError> {
    let len = buf.len();
    let chunk = |i: usize| chunk_range(len, world, i);
    let steps = world - 1;
    // Reduce-scatter: after step s, chunk (rank - s - 1) holds the sum over s + 2 ranks; at the end
    // this rank holds the full sum of chunk (rank + 1).
    for s in 0..steps {
        let (send, recv) =
            split_pair(buf, chunk((rank + world - s) % world), chunk((rank + 2 * world - s - 1) % world));
        let step = s as u32;
        exchange(
            links,
            || {
                let payload: &[u8] = bytemuck::cast_slice(send);
                links.right.write_frame(
                    op,
                    FrameHeader::new(OpCode::AllReduce, T::WIRE_CODE, step, seq, payload.len()),
                    payload,
                )
            },
            || recv_and_add(&links.left, op, step, seq, recv),
        )?;
    }
    // All-gather of the reduced chunks: step s forwards chunk (rank + 1 - s), receives chunk (rank - s).
    for s in 0..steps {
        let (send, recv) = split_pair(buf, chunk((rank + 1 + world - s) % world), chunk((rank + world - s) % world));
        let step = (steps + s) as u32;
        exchange(
            links,
            || {
                let payload: &[u8] = bytemuck::cast_slice(send);
                links.right.write_frame(
                    op,
                    FrameHeader::new(OpCode::AllReduce, T::WIRE_CODE, step, seq, payload.len()),
                    payload,
                )
            },
            || {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(recv);
                links.left.read_fixed_header(op, OpCode::AllReduce, T::WIRE_CODE, step, seq, dst.len())?;
                links.left.read_raw(op, dst)
            },
        )?;
    }
    Ok(())
}

/// Receives one chunk of an all-reduce step and adds it into `dst`, piece by piece.
fn recv_and_add<T: Element>(
    link: &Link,
    op: &'static str,
    step: u32,
    seq: u64,
    dst: &mut [T],
) -> Result<(), CommError> {
    link.read_fixed_header(op, OpCode::AllReduce, T::WIRE_CODE, step, seq, std::mem::size_of_val(dst))?;
    if dst.is_empty() {
        return Ok(());
    }
    let piece = (PIECE_BYTES / std::mem::size_of::<T>().max(1)).clamp(1, dst.len());
    let mut scratch = vec![T::zeroed(); piece];
    for out in dst.chunks_mut(piece) {
        let incoming = &mut scratch[..out.len()];
        link.read_raw(op, bytemuck::cast_slice_mut(incoming))?;
        for (o, i) in out.iter_mut().zip(incoming.iter()) {
            *o = T::add(*o, *i);
        }
    }
    Ok(())
}

/// Ring all-gather of variable-length blocks: step s forwards block (rank - s), receives block
/// (rank - s - 1). Also the barrier (empty blocks): after W - 1 steps every rank has heard, directly
/// or through others, from every rank.
pub(super) fn ring_all_gather(
    links: &Links,
    op: &'static str,
    code: OpCode,
    rank: usize,
    world: usize,
    seq: u64,
    local: &[u8],
) -> Result<Vec<Vec<u8>>, CommError> {
    let mut blocks = vec![Vec::new(); world];
    blocks[rank] = local.to_vec();
    for s in 0..world - 1 {
        let send = &blocks[(rank + world - s) % world];
        let step = s as u32;
        let received = exchange(
            links,
            || links.right.write_frame(op, FrameHeader::new(code, 0, step, seq, send.len()), send),
            || {
                let len = links.left.read_variable_header(op, code, step, seq)?;
                let mut block = vec![0u8; len];
                links.left.read_raw(op, &mut block)?;
                Ok(block)
            },
        )?;
        blocks[(rank + 2 * world - s - 1) % world] = received;
    }
    Ok(blocks)
}

/// Broadcast along the ring from `root`: each rank reads from the left and, unless its right
/// neighbour is the root, forwards every piece as soon as it arrives (pipelined; no cycle, so no
/// deadlock without threads).
pub(super) fn ring_broadcast(
    links: &Links,
    op: &'static str,
    rank: usize,
    seq: u64,
    root: usize,
    buf: &mut Vec<u8>,
) -> Result<(), CommError> {
    if rank == root {
        return links.right.write_frame(op, FrameHeader::new(OpCode::Broadcast, 0, 0, seq, buf.len()), buf);
    }
    let len = links.left.read_variable_header(op, OpCode::Broadcast, 0, seq)?;
    let forward = links.right.peer_rank != root;
    if forward {
        links.right.write_raw(op, &FrameHeader::new(OpCode::Broadcast, 0, 0, seq, len).encode())?;
    }
    buf.clear();
    buf.resize(len, 0);
    for piece in buf.chunks_mut(PIECE_BYTES) {
        links.left.read_raw(op, piece)?;
        if forward {
            links.right.write_raw(op, piece)?;
        }
    }
    Ok(())
}
