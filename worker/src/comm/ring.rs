//! The ring algorithms, as `Plan`s for the progress engine: all-reduce (reduce-scatter then
//! all-gather, in place), reduce-scatter (out of place), all-gather of variable-length blocks (also the
//! barrier), broadcast.
//!
//! Chunk schedule of the reductions, for rank r of W: message i (i = 0, 1, ...) sends chunk
//! `(r - 1 - i) mod W` and receives chunk `(r - 2 - i) mod W`, so message i + 1 forwards exactly what
//! message i received. The first W - 1 received messages are reduced (the last of them completes chunk
//! r, which this rank owns: `reduce_scatter` returns it); an all-reduce then circulates the completed
//! chunks for W - 1 more messages, which are copied. Chunk c is therefore summed in the order
//! `((x[c+1] + x[c+2]) + ...) + x[c]` and computed on rank c alone, so every rank ends with the same bits.

use std::ops::Range;

use super::ReduceOp;
use super::element::Element;
use super::engine::{Expect, Plan, Source};
use super::frame::OpCode;

/// Range of chunk `i` when `len` elements are split into `parts` near-equal chunks (the first
/// `len % parts` chunks hold one element more).
pub fn chunk_range(len: usize, parts: usize, i: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

fn reduce_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 1,
        ReduceOp::Average => 2,
    }
}

/// The chunk index sent by message `i` (and received by message `i - 1`).
fn sent_chunk(rank: usize, world: usize, i: usize) -> usize {
    (rank + 2 * world - 1 - i % world) % world
}

fn received_chunk(rank: usize, world: usize, i: usize) -> usize {
    sent_chunk(rank, world, i + 1)
}

/// Runs `f` on `bytes` viewed as elements; bytes that are not aligned for `T` are copied first.
fn as_elems<T: Element, R>(bytes: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(elems) => f(elems),
        Err(_) => f(&bytes.chunks_exact(size_of::<T>()).map(bytemuck::pod_read_unaligned).collect::<Vec<T>>()),
    }
}

/// In-place all-reduce of `buf`.
pub(super) struct AllReduce<'a, T: Element> {
    buf: &'a mut [T],
    rank: usize,
    world: usize,
    op: ReduceOp,
}

impl<'a, T: Element> AllReduce<'a, T> {
    pub fn new(buf: &'a mut [T], rank: usize, world: usize, op: ReduceOp) -> Self {
        AllReduce { buf, rank, world, op }
    }

    fn chunk(&self, c: usize) -> Range<usize> {
        chunk_range(self.buf.len(), self.world, c)
    }
}

impl<T: Element> Plan for AllReduce<'_, T> {
    fn kind(&self) -> (OpCode, u8, u8) {
        (OpCode::AllReduce, T::WIRE_CODE, reduce_code(self.op))
    }

    fn elem_size(&self) -> usize {
        size_of::<T>()
    }

    fn tx_count(&self) -> usize {
        2 * (self.world - 1)
    }

    fn tx_source(&self, i: usize) -> Source {
        if i == 0 { Source::Local } else { Source::Forward(i - 1) }
    }

    fn tx_len(&self, i: usize) -> usize {
        self.chunk(sent_chunk(self.rank, self.world, i)).len() * size_of::<T>()
    }

    fn tx_bytes(&self, i: usize, range: Range<usize>) -> &[u8] {
        let chunk = self.chunk(sent_chunk(self.rank, self.world, i));
        &bytemuck::cast_slice(&self.buf[chunk])[range]
    }

    fn rx_count(&self) -> usize {
        2 * (self.world - 1)
    }

    fn rx_expect(&self, i: usize) -> Expect {
        Expect::Fixed(self.chunk(received_chunk(self.rank, self.world, i)).len() * size_of::<T>())
    }

    fn rx_copies(&self, i: usize) -> bool {
        i >= self.world - 1
    }

    fn rx_dst(&mut self, i: usize, range: Range<usize>) -> &mut [u8] {
        let chunk = self.chunk(received_chunk(self.rank, self.world, i));
        &mut bytemuck::cast_slice_mut(&mut self.buf[chunk])[range]
    }

    fn rx_reduce(&mut self, i: usize, offset: usize, incoming: &[u8]) {
        let start = self.chunk(received_chunk(self.rank, self.world, i)).start + offset / size_of::<T>();
        let divisor = (self.op == ReduceOp::Average && i == self.world - 2).then_some(self.world);
        let buf = &mut *self.buf;
        as_elems::<T, _>(incoming, |inc| T::reduce_in_place(&mut buf[start..start + inc.len()], inc, divisor));
    }
}

/// Reduce-scatter of `input` into `out` (this rank's chunk), through `work` (as long as `input`) for
/// the partial sums that travel on.
pub(super) struct ReduceScatter<'a, T: Element> {
    input: &'a [T],
    work: &'a mut [T],
    out: &'a mut [T],
    rank: usize,
    world: usize,
    op: ReduceOp,
}

impl<'a, T: Element> ReduceScatter<'a, T> {
    pub fn new(input: &'a [T], work: &'a mut [T], out: &'a mut [T], rank: usize, world: usize, op: ReduceOp) -> Self {
        debug_assert_eq!(input.len(), work.len());
        debug_assert_eq!(out.len(), chunk_range(input.len(), world, rank).len());
        ReduceScatter { input, work, out, rank, world, op }
    }

    fn chunk(&self, c: usize) -> Range<usize> {
        chunk_range(self.input.len(), self.world, c)
    }
}

impl<T: Element> Plan for ReduceScatter<'_, T> {
    fn kind(&self) -> (OpCode, u8, u8) {
        (OpCode::ReduceScatter, T::WIRE_CODE, reduce_code(self.op))
    }

    fn elem_size(&self) -> usize {
        size_of::<T>()
    }

    fn tx_count(&self) -> usize {
        self.world - 1
    }

    fn tx_source(&self, i: usize) -> Source {
        if i == 0 { Source::Local } else { Source::Forward(i - 1) }
    }

    fn tx_len(&self, i: usize) -> usize {
        self.chunk(sent_chunk(self.rank, self.world, i)).len() * size_of::<T>()
    }

    fn tx_bytes(&self, i: usize, range: Range<usize>) -> &[u8] {
        let chunk = self.chunk(sent_chunk(self.rank, self.world, i));
        let source = if i == 0 { &self.input[chunk] } else { &self.work[chunk] };
        &bytemuck::cast_slice(source)[range]
    }

    fn rx_count(&self) -> usize {
        self.world - 1
    }

    fn rx_expect(&self, i: usize) -> Expect {
        Expect::Fixed(self.chunk(received_chunk(self.rank, self.world, i)).len() * size_of::<T>())
    }

    fn rx_copies(&self, _i: usize) -> bool {
        false
    }

    fn rx_dst(&mut self, _i: usize, _range: Range<usize>) -> &mut [u8] {
        &mut []
    }

    fn rx_reduce(&mut self, i: usize, offset: usize, incoming: &[u8]) {
        let chunk = self.chunk(received_chunk(self.rank, self.world, i));
        let at = offset / size_of::<T>();
        let last = i == self.world - 2;
        let divisor = (self.op == ReduceOp::Average && last).then_some(self.world);
        let input = self.input;
        let dst = if last { &mut *self.out } else { &mut self.work[chunk.clone()] };
        as_elems::<T, _>(incoming, |inc| {
            let n = inc.len();
            T::reduce_into(&mut dst[at..at + n], &input[chunk.start + at..chunk.start + at + n], inc, divisor);
        });
    }
}

/// All-gather of variable-length byte blocks: message i sends block `(r - i) mod W` and receives block
/// `(r - 1 - i) mod W`. With empty blocks, the barrier: after W - 1 messages every rank has heard,
/// directly or through others, from every rank.
pub(super) struct AllGather {
    pub blocks: Vec<Vec<u8>>,
    code: OpCode,
    rank: usize,
    world: usize,
}

impl AllGather {
    pub fn new(local: Vec<u8>, code: OpCode, rank: usize, world: usize) -> Self {
        let mut blocks = vec![Vec::new(); world];
        blocks[rank] = local;
        AllGather { blocks, code, rank, world }
    }

    fn sent_block(&self, i: usize) -> usize {
        (self.rank + self.world - i) % self.world
    }

    fn received_block(&self, i: usize) -> usize {
        self.sent_block(i + 1)
    }
}

impl Plan for AllGather {
    fn kind(&self) -> (OpCode, u8, u8) {
        (self.code, 0, 0)
    }

    fn elem_size(&self) -> usize {
        1
    }

    fn tx_count(&self) -> usize {
        self.world - 1
    }

    fn tx_source(&self, i: usize) -> Source {
        if i == 0 { Source::Local } else { Source::Forward(i - 1) }
    }

    fn tx_len(&self, i: usize) -> usize {
        self.blocks[self.sent_block(i)].len()
    }

    fn tx_bytes(&self, i: usize, range: Range<usize>) -> &[u8] {
        &self.blocks[self.sent_block(i)][range]
    }

    fn rx_count(&self) -> usize {
        self.world - 1
    }

    fn rx_expect(&self, _i: usize) -> Expect {
        Expect::Variable
    }

    fn rx_begin(&mut self, i: usize, len: usize) {
        let b = self.received_block(i);
        self.blocks[b] = vec![0; len];
    }

    fn rx_copies(&self, _i: usize) -> bool {
        true
    }

    fn rx_dst(&mut self, i: usize, range: Range<usize>) -> &mut [u8] {
        let b = self.received_block(i);
        &mut self.blocks[b][range]
    }

    fn rx_reduce(&mut self, _i: usize, _offset: usize, _incoming: &[u8]) {}
}

/// Broadcast along the ring from the root: every other rank receives one message and forwards it as
/// it arrives, unless its right neighbour is the root.
pub(super) struct Broadcast<'a> {
    buf: &'a mut Vec<u8>,
    is_root: bool,
    forwards: bool,
}

impl<'a> Broadcast<'a> {
    pub fn new(buf: &'a mut Vec<u8>, rank: usize, world: usize, root: usize) -> Self {
        Broadcast { buf, is_root: rank == root, forwards: rank != root && (rank + 1) % world != root }
    }
}

impl Plan for Broadcast<'_> {
    fn kind(&self) -> (OpCode, u8, u8) {
        (OpCode::Broadcast, 0, 0)
    }

    fn elem_size(&self) -> usize {
        1
    }

    fn tx_count(&self) -> usize {
        usize::from(self.is_root || self.forwards)
    }

    fn tx_source(&self, _i: usize) -> Source {
        if self.is_root { Source::Local } else { Source::Forward(0) }
    }

    fn tx_len(&self, _i: usize) -> usize {
        self.buf.len()
    }

    fn tx_bytes(&self, _i: usize, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    fn rx_count(&self) -> usize {
        usize::from(!self.is_root)
    }

    fn rx_expect(&self, _i: usize) -> Expect {
        Expect::Variable
    }

    fn rx_begin(&mut self, _i: usize, len: usize) {
        self.buf.clear();
        self.buf.resize(len, 0);
    }

    fn rx_copies(&self, _i: usize) -> bool {
        true
    }

    fn rx_dst(&mut self, _i: usize, range: Range<usize>) -> &mut [u8] {
        &mut self.buf[range]
    }

    fn rx_reduce(&mut self, _i: usize, _offset: usize, _incoming: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_partition_the_buffer(len in 0usize..10_000, parts in 1usize..9) {
            let mut next = 0;
            for i in 0..parts {
                let r = chunk_range(len, parts, i);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.len() == len / parts || r.len() == len / parts + 1);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn each_message_forwards_what_the_previous_one_received(rank in 0usize..8, world in 2usize..9) {
            let rank = rank % world;
            for i in 0..2 * (world - 1) - 1 {
                prop_assert_eq!(sent_chunk(rank, world, i + 1), received_chunk(rank, world, i));
            }
            // The last reducing message completes this rank's own chunk.
            prop_assert_eq!(received_chunk(rank, world, world - 2), rank);
            // The right neighbour receives at message i what this rank sends at message i.
            prop_assert_eq!(received_chunk((rank + 1) % world, world, 0), sent_chunk(rank, world, 0));
        }
    }
}
