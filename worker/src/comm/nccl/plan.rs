//! The agreement step in front of every NCCL collective, and the layouts of the padded collectives.
//! Pure.
//!
//! NCCL trusts its caller: ranks passing different counts, kinds or collectives hang or corrupt
//! memory. So every collective first all-gathers a fixed-size [`Header`] (what this rank is about to
//! do, on what), and every rank checks all headers against the same reference (rank 0, or the root)
//! before touching the data. All ranks thus reach the same verdict, and skip the data step together.
//! The barrier is that exchange alone.

use std::ops::Range;

use tch::Kind;

/// Dimensions carried in a header; a tensor with more cannot be gathered or broadcast.
pub(super) const MAX_DIMS: usize = 8;
/// Header length in `i64`s.
pub(super) const HEADER_LEN: usize = 5 + MAX_DIMS;
/// The `kind` of a header whose rank rejected its input.
const REJECTED: i64 = -2;

/// The collective a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpCode {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGatherCat = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl OpCode {
    fn from_i64(v: i64) -> Option<OpCode> {
        [OpCode::AllReduce, OpCode::ReduceScatter, OpCode::AllGatherCat, OpCode::Broadcast, OpCode::Barrier]
            .into_iter()
            .find(|op| *op as i64 == v)
    }

    fn name(v: i64) -> String {
        match OpCode::from_i64(v) {
            Some(OpCode::AllReduce) => "all_reduce".to_owned(),
            Some(OpCode::ReduceScatter) => "reduce_scatter".to_owned(),
            Some(OpCode::AllGatherCat) => "all_gather_cat".to_owned(),
            Some(OpCode::Broadcast) => "broadcast".to_owned(),
            Some(OpCode::Barrier) => "barrier".to_owned(),
            None => format!("an unknown collective ({v})"),
        }
    }
}

/// What one rank is about to do. `arg` is the reduce op (all-reduce, reduce-scatter) or the root
/// (broadcast); `dims` is empty where shapes are not compared (reductions compare `numel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub op: i64,
    pub kind: i64,
    pub arg: i64,
    pub numel: i64,
    pub dims: Vec<i64>,
}

impl Header {
    pub(super) fn new(op: OpCode, kind: Option<Kind>, arg: i64, numel: i64, dims: &[i64]) -> Result<Header, String> {
        if dims.len() > MAX_DIMS {
            return Err(format!("the tensor has {} dims; at most {MAX_DIMS} are supported", dims.len()));
        }
        Ok(Header { op: op as i64, kind: kind.map_or(-1, kind_code), arg, numel, dims: dims.to_vec() })
    }

    /// Announces that this rank rejected its input (a CPU tensor, an unsupported kind): the peers
    /// learn it in the exchange and fail the collective too, instead of waiting for this rank.
    pub(super) fn rejected(op: OpCode) -> Header {
        Header { op: op as i64, kind: REJECTED, arg: -1, numel: -1, dims: Vec::new() }
    }

    pub(super) fn encode(&self) -> [i64; HEADER_LEN] {
        let mut out = [-1; HEADER_LEN];
        out[..5].copy_from_slice(&[self.op, self.kind, self.arg, self.numel, self.dims.len() as i64]);
        out[5..5 + self.dims.len()].copy_from_slice(&self.dims);
        out
    }

    /// Decodes a header received from a peer (`Err` for garbage, which means a corrupt exchange).
    pub(super) fn decode(raw: &[i64]) -> Result<Header, String> {
        let [op, kind, arg, numel, ndim] =
            raw.get(..5).and_then(|h| <[i64; 5]>::try_from(h).ok()).ok_or("short header")?;
        let ndim = usize::try_from(ndim).ok().filter(|n| *n <= MAX_DIMS).ok_or(format!("bad dim count {ndim}"))?;
        let dims = raw.get(5..5 + ndim).ok_or("short header")?.to_vec();
        Ok(Header { op, kind, arg, numel, dims })
    }

    fn describe(&self) -> String {
        let kind = kind_from_code(self.kind).map_or_else(|| format!("kind #{}", self.kind), |k| format!("{k:?}"));
        if self.dims.is_empty() {
            format!("{kind} with {} elements", self.numel)
        } else {
            format!("{kind} {:?}", self.dims)
        }
    }
}

/// A disagreement between ranks found in the headers: every rank finds the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Disagreement {
    /// Rank `rank` called another collective than rank 0 (calls out of order).
    Order { rank: usize, detail: String },
    /// Rank `rank` passed a tensor (or root) that does not match the reference.
    Mismatch { rank: usize, detail: String },
}

/// All ranks announce the same collective as rank 0, and none rejected its input.
pub(super) fn check_order(headers: &[Header]) -> Result<(), Disagreement> {
    let reference = headers.first().map_or(-1, |h| h.op);
    if let Some(rank) = headers.iter().position(|h| h.op != reference) {
        return Err(Disagreement::Order {
            rank,
            detail: format!(
                "rank {rank} called {} while rank 0 called {}",
                OpCode::name(headers[rank].op),
                OpCode::name(reference)
            ),
        });
    }
    match headers.iter().position(|h| h.kind == REJECTED) {
        None => Ok(()),
        Some(rank) => Err(Disagreement::Mismatch {
            rank,
            detail: format!("rank {rank} rejected its input to {} (its own error says why)", OpCode::name(reference)),
        }),
    }
}

/// All-reduce and reduce-scatter: same kind, reduce op and element count as rank 0.
pub(super) fn check_reduce(headers: &[Header]) -> Result<(), Disagreement> {
    check_order(headers)?;
    let reference = &headers[0];
    for (rank, h) in headers.iter().enumerate() {
        if h.kind != reference.kind || h.numel != reference.numel {
            return Err(Disagreement::Mismatch {
                rank,
                detail: format!("rank {rank} has {}, rank 0 has {}", h.describe(), reference.describe()),
            });
        }
        if h.arg != reference.arg {
            return Err(Disagreement::Mismatch {
                rank,
                detail: format!("rank {rank} asked for reduce op #{}, rank 0 for #{}", h.arg, reference.arg),
            });
        }
    }
    Ok(())
}

/// Broadcast: same root everywhere, and every tensor like the root's.
pub(super) fn check_broadcast(headers: &[Header]) -> Result<usize, Disagreement> {
    check_order(headers)?;
    let root = headers[0].arg;
    if let Some(rank) = headers.iter().position(|h| h.arg != root) {
        return Err(Disagreement::Mismatch {
            rank,
            detail: format!("rank {rank} named root {}, rank 0 named root {root}", headers[rank].arg),
        });
    }
    let root = usize::try_from(root).ok().filter(|r| *r < headers.len()).ok_or_else(|| Disagreement::Mismatch {
        rank: 0,
        detail: format!("root {root} is not a rank of {}", headers.len()),
    })?;
    let reference = &headers[root];
    for (rank, h) in headers.iter().enumerate() {
        if h.kind != reference.kind || h.dims != reference.dims {
            return Err(Disagreement::Mismatch {
                rank,
                detail: format!("rank {rank} has {}, root {root} has {}", h.describe(), reference.describe()),
            });
        }
    }
    Ok(root)
}

/// How `all_gather_cat` moves rows when ranks hold different numbers of them: every rank sends a
/// buffer padded to `max_rows`, NCCL all-gathers the padded buffers, and rank `r`'s rows are then
/// `[r * max_rows, r * max_rows + rows[r])` of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GatherPlan {
    pub rows: Vec<i64>,
    pub max_rows: i64,
    pub total_rows: i64,
    /// Dims after the first, common to all ranks.
    pub trailing: Vec<i64>,
}

impl GatherPlan {
    /// Every rank holds `max_rows` rows: gather directly, no padding or trimming.
    pub(super) fn uniform(&self) -> bool {
        self.rows.iter().all(|r| *r == self.max_rows)
    }

    /// Row ranges of the padded gather result that hold real rows, in rank order (empty ones skipped).
    pub(super) fn segments(&self) -> Vec<(i64, i64)> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, rows)| **rows > 0)
            .map(|(rank, rows)| (rank as i64 * self.max_rows, *rows))
            .collect()
    }

    /// Shape of the concatenation.
    pub(super) fn output_dims(&self) -> Vec<i64> {
        std::iter::once(self.total_rows).chain(self.trailing.iter().copied()).collect()
    }
}

/// `all_gather_cat`: same kind and dims after the first as rank 0; the row counts may differ.
pub(super) fn plan_gather(headers: &[Header]) -> Result<GatherPlan, Disagreement> {
    check_order(headers)?;
    let reference = &headers[0];
    for (rank, h) in headers.iter().enumerate() {
        if h.kind != reference.kind
            || h.dims.is_empty()
            || h.dims.len() != reference.dims.len()
            || h.dims[1..] != reference.dims[1..]
        {
            return Err(Disagreement::Mismatch {
                rank,
                detail: format!(
                    "rank {rank} has {}, rank 0 has {} (all dims but the first, and the kind, must agree)",
                    h.describe(),
                    reference.describe()
                ),
            });
        }
    }
    let rows: Vec<i64> = headers.iter().map(|h| h.dims[0]).collect();
    Ok(GatherPlan {
        max_rows: rows.iter().copied().max().unwrap_or(0),
        total_rows: rows.iter().sum(),
        trailing: reference.dims[1..].to_vec(),
        rows,
    })
}

/// `reduce_scatter` of `numel` elements over `world` ranks: rank `r` gets `chunk_range(numel, world, r)`,
/// chunks that differ in length by one when `world` does not divide `numel`. NCCL's reduce-scatter
/// wants equal chunks, so chunk `r` is copied to `[r * padded, r * padded + len)` of a zeroed buffer of
/// `world * padded` elements. Returns `padded` and the chunks (`None` when no padding is needed).
pub(super) fn scatter_layout(numel: usize, world: usize) -> (usize, Option<Vec<Range<usize>>>) {
    let chunks: Vec<Range<usize>> = (0..world).map(|r| crate::comm::chunk_range(numel, world, r)).collect();
    let padded = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
    if chunks.iter().all(|c| c.len() == padded) { (padded, None) } else { (padded, Some(chunks)) }
}

/// c10's `ScalarType` numbering (what travels in headers).
pub(super) fn kind_code(kind: Kind) -> i64 {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::ComplexHalf => 8,
        Kind::ComplexFloat => 9,
        Kind::ComplexDouble => 10,
        Kind::Bool => 11,
        Kind::QInt8 => 12,
        Kind::QUInt8 => 13,
        Kind::QInt32 => 14,
        Kind::BFloat16 => 15,
        Kind::Float8e5m2 => 23,
        Kind::Float8e4m3fn => 24,
        Kind::Float8e5m2fnuz => 25,
        Kind::Float8e4m3fnuz => 26,
    }
}

fn kind_from_code(code: i64) -> Option<Kind> {
    const KINDS: [Kind; 20] = [
        Kind::Uint8,
        Kind::Int8,
        Kind::Int16,
        Kind::Int,
        Kind::Int64,
        Kind::Half,
        Kind::Float,
        Kind::Double,
        Kind::ComplexHalf,
        Kind::ComplexFloat,
        Kind::ComplexDouble,
        Kind::Bool,
        Kind::QInt8,
        Kind::QUInt8,
        Kind::QInt32,
        Kind::BFloat16,
        Kind::Float8e5m2,
        Kind::Float8e4m3fn,
        Kind::Float8e5m2fnuz,
        Kind::Float8e4m3fnuz,
    ];
    KINDS.into_iter().find(|k| kind_code(*k) == code)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn gather_header(kind: Kind, dims: &[i64]) -> Header {
        Header::new(OpCode::AllGatherCat, Some(kind), 0, dims.iter().product(), dims).expect("header")
    }

    #[test]
    fn headers_round_trip_through_their_encoding() {
        for dims in [&[][..], &[0], &[3, 4], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            let h =
                Header::new(OpCode::Broadcast, Some(Kind::BFloat16), 2, dims.iter().product(), dims).expect("header");
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
        assert!(Header::new(OpCode::Broadcast, None, 0, 1, &[1; 9]).is_err());
        assert!(Header::decode(&[1, 6, 0, 1, 99]).is_err());
        assert!(Header::decode(&[1, 6]).is_err());
    }

    #[test]
    fn gather_plan_for_unequal_rows_pads_to_the_largest_and_trims() {
        let headers = [
            gather_header(Kind::Float, &[3, 4]),
            gather_header(Kind::Float, &[0, 4]),
            gather_header(Kind::Float, &[5, 4]),
        ];
        let plan = plan_gather(&headers).expect("plan");
        assert_eq!(plan.rows, vec![3, 0, 5]);
        assert_eq!((plan.max_rows, plan.total_rows), (5, 8));
        assert!(!plan.uniform());
        // Padded result: rank 0 in rows 0..5 (3 real), rank 1 in 5..10 (none), rank 2 in 10..15 (5 real).
        assert_eq!(plan.segments(), vec![(0, 3), (10, 5)]);
        assert_eq!(plan.output_dims(), vec![8, 4]);
    }

    #[test]
    fn gather_plan_for_equal_rows_and_for_no_rows() {
        let equal = plan_gather(&[gather_header(Kind::Int64, &[2]), gather_header(Kind::Int64, &[2])]).expect("plan");
        assert!(equal.uniform());
        assert_eq!(equal.output_dims(), vec![4]);
        let empty =
            plan_gather(&[gather_header(Kind::Bool, &[0, 3]), gather_header(Kind::Bool, &[0, 3])]).expect("plan");
        assert_eq!((empty.max_rows, empty.total_rows, empty.segments()), (0, 0, vec![]));
        assert_eq!(empty.output_dims(), vec![0, 3]);
    }

    #[test]
    fn gather_disagreements_name_the_rank_that_differs_from_rank_0() {
        let ok = gather_header(Kind::Float, &[2, 4]);
        let cases = [
            (gather_header(Kind::Double, &[2, 4]), "Double"),
            (gather_header(Kind::Float, &[2, 5]), "[2, 5]"),
            (gather_header(Kind::Float, &[2, 4, 1]), "[2, 4, 1]"),
        ];
        for (bad, shown) in cases {
            match plan_gather(&[ok.clone(), ok.clone(), bad]) {
                Err(Disagreement::Mismatch { rank: 2, detail }) => assert!(detail.contains(shown), "{detail}"),
                other => panic!("expected a mismatch of rank 2, got {other:?}"),
            }
        }
        let barrier = Header::new(OpCode::Barrier, None, 0, 0, &[]).expect("header");
        match plan_gather(&[ok, barrier]) {
            Err(Disagreement::Order { rank: 1, detail }) => {
                assert_eq!(detail, "rank 1 called barrier while rank 0 called all_gather_cat")
            }
            other => panic!("expected an order error, got {other:?}"),
        }
    }

    #[test]
    fn a_rank_that_rejected_its_input_is_named_to_all() {
        let ok = gather_header(Kind::Float, &[2, 4]);
        match plan_gather(&[ok.clone(), Header::rejected(OpCode::AllGatherCat), ok]) {
            Err(Disagreement::Mismatch { rank: 1, detail }) => {
                assert_eq!(detail, "rank 1 rejected its input to all_gather_cat (its own error says why)")
            }
            other => panic!("expected a mismatch of rank 1, got {other:?}"),
        }
    }

    #[test]
    fn reductions_compare_kind_count_and_op_but_not_shape() {
        let h = |kind, numel, arg| Header::new(OpCode::AllReduce, Some(kind), arg, numel, &[]).expect("header");
        assert_eq!(check_reduce(&[h(Kind::Float, 12, 0), h(Kind::Float, 12, 0)]), Ok(()));
        assert!(matches!(
            check_reduce(&[h(Kind::Float, 12, 0), h(Kind::Float, 12, 0), h(Kind::Float, 13, 0)]),
            Err(Disagreement::Mismatch { rank: 2, .. })
        ));
        assert!(matches!(
            check_reduce(&[h(Kind::Float, 12, 0), h(Kind::BFloat16, 12, 0)]),
            Err(Disagreement::Mismatch { rank: 1, .. })
        ));
        assert!(matches!(
            check_reduce(&[h(Kind::Float, 12, 0), h(Kind::Float, 12, 1)]),
            Err(Disagreement::Mismatch { rank: 1, .. })
        ));
    }

    #[test]
    fn broadcast_compares_against_the_root() {
        let h = |dims: &[i64], root| {
            Header::new(OpCode::Broadcast, Some(Kind::Float), root, dims.iter().product(), dims).expect("header")
        };
        assert_eq!(check_broadcast(&[h(&[2, 3], 1), h(&[2, 3], 1)]), Ok(1));
        // Rank 0 differs from the root (rank 1): rank 0 is named.
        assert!(matches!(
            check_broadcast(&[h(&[3, 2], 1), h(&[2, 3], 1)]),
            Err(Disagreement::Mismatch { rank: 0, .. })
        ));
        assert!(matches!(
            check_broadcast(&[h(&[2, 3], 0), h(&[2, 3], 1)]),
            Err(Disagreement::Mismatch { rank: 1, .. })
        ));
    }

    #[test]
    fn scatter_layout_pads_only_when_the_world_does_not_divide() {
        assert_eq!(scatter_layout(12, 3), (4, None));
        assert_eq!(scatter_layout(0, 3), (0, None));
        let (padded, chunks) = scatter_layout(7, 3);
        assert_eq!(padded, 3);
        assert_eq!(chunks, Some(vec![0..3, 3..5, 5..7]));
    }

    proptest! {
        #[test]
        fn scatter_chunks_cover_every_element_once_and_fit_their_slot(numel in 0usize..500, world in 1usize..9) {
            let (padded, chunks) = scatter_layout(numel, world);
            let chunks = chunks.unwrap_or_else(|| (0..world).map(|r| r * padded..(r + 1) * padded).collect());
            prop_assert_eq!(chunks.len(), world);
            let mut next = 0;
            for c in &chunks {
                prop_assert_eq!(c.start, next);
                prop_assert!(c.len() <= padded);
                next = c.end;
            }
            prop_assert_eq!(next, numel);
        }

        #[test]
        fn gather_segments_select_exactly_the_real_rows(rows in proptest::collection::vec(0i64..6, 1..6)) {
            let headers: Vec<Header> = rows.iter().map(|r| gather_header(Kind::Float, &[*r, 2])).collect();
            let plan = plan_gather(&headers).expect("plan");
            // Label each padded row with (rank, index) and check that the segments pick rows in order.
            let padded: Vec<Option<(usize, i64)>> = (0..rows.len())
                .flat_map(|rank| (0..plan.max_rows).map(move |i| (rank, i)))
                .map(|(rank, i)| (i < rows[rank]).then_some((rank, i)))
                .collect();
            let picked: Vec<Option<(usize, i64)>> =
                plan.segments().iter().flat_map(|(start, len)| padded[*start as usize..(*start + *len) as usize].to_vec()).collect();
            let expected: Vec<Option<(usize, i64)>> =
                rows.iter().enumerate().flat_map(|(rank, n)| (0..*n).map(move |i| Some((rank, i)))).collect();
            prop_assert_eq!(picked, expected);
            prop_assert_eq!(plan.total_rows, rows.iter().sum::<i64>());
        }
    }
}
