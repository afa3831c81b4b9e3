//! `heavy_hitters(capacity, bytes, packets, key, ...)`: the keys with the most bytes in each
//! group, in state bounded by `capacity` whatever the number of records.
//!
//! An exact GROUP BY on conversations keeps about one state row per record (nearly every flow is
//! its own conversation), so its memory and its close grow with the flow rate. This aggregate keeps
//! a Space-Saving summary per group instead: at most `capacity` counters and a `bound`, an upper
//! bound on the bytes of any key not listed. Summaries merge (Cafaro et al.'s rule for
//! Space-Saving), so the aggregate runs as DataFusion's partial, reduce and final aggregate, and
//! its state goes through checkpoints and the scale-out topics like any other.
//!
//! The guarantee, for a group of N bytes (docs/sql.md states it for operators):
//! - every key with more than N / capacity bytes is listed;
//! - a listed key's `bytes` is never below its true bytes, and `bytes - error` never above them;
//!   `error` ≤ N / capacity;
//! - a group with at most `capacity` distinct keys is exact (`error` = 0), however its records were
//!   cut into batches, partitions and merges;
//! - `packets` and `records` count from when the key was last admitted: lower bounds.
//!
//! The result is a list of structs (the keys, `bytes`, `packets`, `records`, `error`), largest
//! first, ties broken by key; SQL's `unnest` turns it into rows.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, ListArray, StructArray, UInt64Array};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, UInt64Type};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::{AggregateOrderSensitivity, format_state_name};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_plan::PhysicalExpr;

/// The function's name in SQL.
pub const NAME: &str = "heavy_hitters";
/// The largest capacity accepted: one state row stays well under the shared topics' message size.
pub const MAX_CAPACITY: usize = 4096;
/// A group merging many states is pruned once it holds this many times `capacity` counters.
const PRUNE_AT: usize = 2;
/// Keys a new summary has room for.
const INITIAL_ROOM: usize = 64;
/// Arguments before the keys: capacity, bytes, packets.
const FIXED_ARGS: usize = 3;

/// The aggregate, ready to register in a `SessionContext`.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::new_from_impl(HeavyHitters { signature: Signature::user_defined(Volatility::Immutable) })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HeavyHitters {
    signature: Signature,
}

/// A key column as the result lists it: dictionaries come back as their values.
fn output_key_type(t: &DataType) -> DataType {
    match t {
        DataType::Dictionary(_, values) => values.as_ref().clone(),
        other => other.clone(),
    }
}

/// The struct of one result entry: the keys named as their arguments, then the counters.
fn result_entry(key_fields: &[FieldRef]) -> Fields {
    let mut fields: Vec<Field> = key_fields.iter().map(|f| Field::new(f.name(), output_key_type(f.data_type()), true)).collect();
    fields.push(Field::new("bytes", DataType::UInt64, false));
    fields.push(Field::new("packets", DataType::UInt64, false));
    fields.push(Field::new("records", DataType::Int64, false));
    // Nullable: history files written before the column existed read as NULL.
    fields.push(Field::new("error", DataType::UInt64, true));
    fields.into()
}

/// The element field of a list of `entry` structs: one definition for the declared types and
/// the built arrays, which must match exactly.
fn item_of(entry: Fields) -> FieldRef {
    Arc::new(Field::new("item", DataType::Struct(entry), false))
}

fn list_of(entry: Fields) -> DataType {
    DataType::List(item_of(entry))
}

/// A list per summary of `entry` structs made of `columns`, `lengths` entries each.
fn lists(entry: Fields, columns: Vec<ArrayRef>, lengths: Vec<usize>) -> Result<ListArray> {
    let entries = StructArray::try_new(entry.clone(), columns, None)?;
    Ok(ListArray::try_new(item_of(entry), OffsetBuffer::from_lengths(lengths), Arc::new(entries), None)?)
}

/// The counters of several summaries, each ranked, laid end to end (the rows of their lists).
#[derive(Default)]
struct Ranked<'a> {
    keys: Vec<&'a [u8]>,
    counters: Vec<Counter>,
    /// Entries per summary.
    lengths: Vec<usize>,
}

impl<'a> Ranked<'a> {
    fn of(summaries: &'a [Summary]) -> Self {
        let mut out = Ranked { lengths: Vec::with_capacity(summaries.len()), ..Ranked::default() };
        for summary in summaries {
            let ranked = summary.ranked();
            out.lengths.push(ranked.len());
            for (key, c) in ranked {
                out.keys.push(key);
                out.counters.push(*c);
            }
        }
        out
    }

    fn column(&self, field: impl Fn(&Counter) -> u64) -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(self.counters.iter().map(field)))
    }
}

/// The struct of one state entry: the key in arrow's row format, then the counters.
fn state_entry() -> Fields {
    vec![
        Field::new("key", DataType::Binary, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("error", DataType::UInt64, false),
        Field::new("packets", DataType::UInt64, false),
        Field::new("records", DataType::UInt64, false),
    ]
    .into()
}

fn check_arity(n: usize) -> Result<()> {
    if n <= FIXED_ARGS {
        return plan_err!("{NAME}(capacity, bytes, packets, key, ...) needs at least one key (got {n} arguments)");
    }
    Ok(())
}

impl AggregateUDFImpl for HeavyHitters {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        check_arity(arg_types.len())?;
        let mut types = vec![DataType::Int64, DataType::UInt64, DataType::UInt64];
        types.extend(arg_types[FIXED_ARGS..].iter().cloned());
        Ok(types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        check_arity(arg_types.len())?;
        let keys: Vec<FieldRef> = arg_types[FIXED_ARGS..]
            .iter()
            .enumerate()
            .map(|(i, t)| Arc::new(Field::new(format!("key{}", i + 1), t.clone(), true)))
            .collect();
        Ok(list_of(result_entry(&keys)))
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        check_arity(arg_fields.len())?;
        Ok(Arc::new(Field::new(NAME, list_of(result_entry(&arg_fields[FIXED_ARGS..])), true)))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(format_state_name(args.name, "bound"), DataType::UInt64, true)),
            Arc::new(Field::new(format_state_name(args.name, "counters"), list_of(state_entry()), true)),
        ])
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::Insensitive
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(OneGroup(Groups::new(&args)?)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups::new(&args)?))
    }
}

/// The capacity argument: a literal from 1 to [`MAX_CAPACITY`].
pub(crate) fn capacity_of(expr: &Arc<dyn PhysicalExpr>) -> Result<usize> {
    let empty = datafusion::arrow::array::RecordBatch::new_empty(Arc::new(datafusion::arrow::datatypes::Schema::empty()));
    let value = match expr.evaluate(&empty) {
        Ok(ColumnarValue::Scalar(value)) => value,
        _ => return plan_err!("{NAME}: the capacity (first argument) must be a number literal"),
    };
    match value {
        ScalarValue::Int64(Some(n)) if (1..=MAX_CAPACITY as i64).contains(&n) => Ok(n as usize),
        other => plan_err!("{NAME}: the capacity (first argument) must be from 1 to {MAX_CAPACITY}, not {other}"),
    }
}

/// One counter: bytes (an overestimate by at most `error`), packets and records since admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub bytes: u64,
    pub error: u64,
    pub packets: u64,
    pub records: u64,
}

/// A Space-Saving summary: at most `capacity` counters once pruned, and `bound`, the most bytes
/// any unlisted key can have had. Keys live in one byte arena per summary (most records bring a
/// new conversation: one allocation each would cost more than the counting).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub bound: u64,
    arena: Vec<u8>,
    entries: Vec<Entry>,
    /// Indices into `entries`, hashed by key.
    index: hashbrown::HashTable<u32>,
}

/// A listed key (its bytes in the arena, its hash) and its counter.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u32,
    len: u32,
    /// Kept so that growing or rebuilding the index never hashes a key again.
    hash: u64,
    counter: Counter,
}

fn hash(key: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0x5eed).hash_one(key)
}

/// Order of the result: most bytes first, then by key.
fn rank(a: (&[u8], &Counter), b: (&[u8], &Counter)) -> std::cmp::Ordering {
    b.1.bytes.cmp(&a.1.bytes).then_with(|| a.0.cmp(b.0))
}

impl Summary {
    /// How many keys are listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn key(&self, e: &Entry) -> &[u8] {
        &self.arena[e.start as usize..(e.start + e.len) as usize]
    }

    /// The counter of `key`, or a new one made by `enter` (the key's first counter here).
    fn counter(&mut self, key: &[u8], enter: impl FnOnce() -> Counter) -> (&mut Counter, bool) {
        let h = hash(key);
        let (arena, entries) = (&self.arena, &self.entries);
        let found = self.index.find(h, |&i| {
            let e = &entries[i as usize];
            &arena[e.start as usize..(e.start + e.len) as usize] == key
        });
        if let Some(&i) = found {
            return (&mut self.entries[i as usize].counter, false);
        }
        if self.entries.capacity() == 0 {
            self.reserve(INITIAL_ROOM, key.len());
        }
        let i = self.entries.len() as u32;
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.entries.push(Entry { start, len: key.len() as u32, hash: h, counter: enter() });
        let entries = &self.entries;
        self.index.insert_unique(h, i, |&j| entries[j as usize].hash);
        (&mut self.entries[i as usize].counter, true)
    }

    /// Room for `entries` keys of `key_len` bytes without growing (growing a fresh summary
    /// step by step cost more than the counting).
    fn reserve(&mut self, entries: usize, key_len: usize) {
        self.arena.reserve(entries * key_len);
        self.entries.reserve(entries);
        let list = &self.entries;
        self.index.reserve(entries, |&j| list[j as usize].hash);
    }

    /// Adds one record. A key not listed may have had up to `bound` bytes already: it enters with
    /// that much, counted as its error. (Deferring the prune to the end of a batch makes this the
    /// merge of the batch's exact summary.) Returns whether the key is new.
    pub fn add(&mut self, key: &[u8], bytes: u64, packets: u64) -> bool {
        let bound = self.bound;
        let (c, new) = self.counter(key, || Counter { bytes: bound, error: bound, packets: 0, records: 0 });
        c.bytes = c.bytes.saturating_add(bytes);
        c.packets = c.packets.saturating_add(packets);
        c.records += 1;
        new
    }

    /// Merges another summary (its `bound` and counters) into this one, without pruning: merging
    /// k summaries and then pruning once is the k-way merge, which keeps the guarantee (each
    /// summary's unlisted keys are charged its bound, and it has at least as many unchosen
    /// counters of at least that bound as the merge chose keys it lacked).
    pub fn merge<'a>(&mut self, bound: u64, counters: impl IntoIterator<Item = (&'a [u8], Counter)>) {
        let own_bound = self.bound;
        // A key listed here but not there may have had up to `bound` bytes there.
        if bound > 0 {
            for e in &mut self.entries {
                e.counter.bytes = e.counter.bytes.saturating_add(bound);
                e.counter.error = e.counter.error.saturating_add(bound);
            }
        }
        for (key, other) in counters {
            let (c, new) = self.counter(key, || Counter {
                bytes: other.bytes.saturating_add(own_bound),
                error: other.error.saturating_add(own_bound),
                ..other
            });
            if !new {
                c.bytes = (c.bytes - bound).saturating_add(other.bytes);
                c.error = (c.error - bound).saturating_add(other.error);
                c.packets = c.packets.saturating_add(other.packets);
                c.records = c.records.saturating_add(other.records);
            }
        }
        self.bound = own_bound.saturating_add(bound);
    }

    /// Keeps the `capacity` largest counters; the largest one dropped raises `bound`. In place:
    /// a summary is pruned once per merged batch, and building a new one each time (arena,
    /// entries, index) cost more than choosing what to keep.
    pub fn prune(&mut self, capacity: usize) {
        if self.entries.len() <= capacity {
            return;
        }
        let mut order: Vec<u32> = (0..self.entries.len() as u32).collect();
        {
            let by_rank = |a: &u32, b: &u32| {
                let (a, b) = (&self.entries[*a as usize], &self.entries[*b as usize]);
                rank((self.key(a), &a.counter), (self.key(b), &b.counter))
            };
            order.select_nth_unstable_by(capacity, by_rank);
        }
        self.bound = self.bound.max(self.entries[order[capacity] as usize].counter.bytes);
        // The kept entries in their old order: their keys lie in the arena in that order too,
        // so each moves towards the front without overwriting a key still to move.
        order.truncate(capacity);
        order.sort_unstable();
        let mut end = 0;
        for (new, &old) in order.iter().enumerate() {
            let mut e = self.entries[old as usize];
            let (start, len) = (e.start as usize, e.len as usize);
            self.arena.copy_within(start..start + len, end);
            e.start = end as u32;
            end += len;
            self.entries[new] = e;
        }
        self.arena.truncate(end);
        self.entries.truncate(capacity);
        self.index.clear();
        // Room for what merging usually brings before the next prune, no more: one large batch
        // of a single group must not leave its size behind in every window.
        let room = PRUNE_AT * capacity + 1;
        if self.entries.capacity() > 2 * room {
            self.entries.shrink_to(room);
            self.arena.shrink_to(room * (end / capacity).max(1));
        }
        let entries = &self.entries;
        self.index.shrink_to(room, |&j| entries[j as usize].hash);
        for (i, e) in entries.iter().enumerate() {
            self.index.insert_unique(e.hash, i as u32, |&j| entries[j as usize].hash);
        }
    }

    /// The counters, largest first.
    pub fn ranked(&self) -> Vec<(&[u8], &Counter)> {
        let mut ranked: Vec<(&[u8], &Counter)> = self.entries.iter().map(|e| (self.key(e), &e.counter)).collect();
        ranked.sort_unstable_by(|a, b| rank(*a, *b));
        ranked
    }

    fn size(&self) -> usize {
        self.arena.capacity() + self.entries.capacity() * size_of::<Entry>() + self.index.capacity() * 5
    }
}

/// The summaries of every group of one aggregation.
struct Groups {
    capacity: usize,
    keys: RowConverter,
    result_entry: Fields,
    summaries: Vec<Summary>,
}

impl Groups {
    fn new(args: &AccumulatorArgs) -> Result<Self> {
        check_arity(args.exprs.len())?;
        let capacity = capacity_of(&args.exprs[0])?;
        let key_fields = &args.expr_fields[FIXED_ARGS..];
        let keys = RowConverter::new(key_fields.iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
        Ok(Self { capacity, keys, result_entry: result_entry(key_fields), summaries: Vec::new() })
    }

    fn update(&mut self, values: &[ArrayRef], group_indices: &[usize], filter: Option<&BooleanArray>, groups: usize) -> Result<()> {
        self.summaries.resize_with(groups.max(self.summaries.len()), Summary::default);
        let bytes = values[1].as_primitive::<UInt64Type>();
        let packets = values[2].as_primitive::<UInt64Type>();
        let rows = self.keys.convert_columns(&values[FIXED_ARGS..])?;
        let mut crowded = Vec::new();
        for (i, &g) in group_indices.iter().enumerate() {
            if filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            let value = |a: &UInt64Array| if a.is_null(i) { 0 } else { a.value(i) };
            let summary = &mut self.summaries[g];
            if summary.add(rows.row(i).as_ref(), value(bytes), value(packets)) && summary.len() == self.capacity + 1 {
                crowded.push(g);
            }
        }
        for g in crowded {
            self.summaries[g].prune(self.capacity);
        }
        Ok(())
    }

    fn merge(&mut self, values: &[ArrayRef], group_indices: &[usize], groups: usize) -> Result<()> {
        self.summaries.resize_with(groups.max(self.summaries.len()), Summary::default);
        let [bounds, lists] = values else {
            return exec_err!("{NAME}: expected 2 state columns, got {}", values.len());
        };
        let bounds = bounds.as_primitive::<UInt64Type>();
        let lists = lists.as_list::<i32>();
        let entries = lists.values().as_struct();
        let column = |i: usize| entries.column(i).as_primitive::<UInt64Type>();
        let (keys, bytes, errors, packets, records) = (entries.column(0).as_binary::<i32>(), column(1), column(2), column(3), column(4));
        let offsets = lists.value_offsets();
        for (row, &g) in group_indices.iter().enumerate() {
            if lists.is_null(row) {
                continue;
            }
            let bound = if bounds.is_null(row) { 0 } else { bounds.value(row) };
            let range = offsets[row] as usize..offsets[row + 1] as usize;
            let counters = range.map(|j| {
                let counter =
                    Counter { bytes: bytes.value(j), error: errors.value(j), packets: packets.value(j), records: records.value(j) };
                (keys.value(j), counter)
            });
            let summary = &mut self.summaries[g];
            summary.merge(bound, counters);
            // Pruned only once a group has gathered many states' counters, and before its
            // state or result goes out (`pruned`): DataFusion hands a merge its states one
            // batch at a time, and pruning every group after each (a reduce of 16 states
            // pruned each group 16 times) cost more than the merging.
            if summary.len() > PRUNE_AT * self.capacity {
                summary.prune(self.capacity);
            }
        }
        Ok(())
    }

    /// `summaries` cut to `capacity` counters each, as they leave the accumulator.
    fn pruned(capacity: usize, mut summaries: Vec<Summary>) -> Vec<Summary> {
        for summary in &mut summaries {
            summary.prune(capacity);
        }
        summaries
    }

    /// State columns for `summaries`: bounds and counter lists, each summary's counters in the
    /// order its arena holds them. Why not ranked: merging ignores the order, and a partial
    /// aggregate emits about one counter per record, so sorting them and copying keys one by one
    /// cost more than the counting; here each summary's keys are copied in one piece.
    fn state_of(summaries: &[Summary]) -> Result<Vec<ArrayRef>> {
        let bounds = UInt64Array::from_iter_values(summaries.iter().map(|s| s.bound));
        let counters: usize = summaries.iter().map(Summary::len).sum();
        let key_bytes: usize = summaries.iter().map(|s| s.entries.last().map_or(0, |e| (e.start + e.len) as usize)).sum();
        let mut values: Vec<u8> = Vec::with_capacity(key_bytes);
        let mut offsets: Vec<i32> = Vec::with_capacity(counters + 1);
        offsets.push(0);
        let mut counter_columns: [Vec<u64>; 4] = std::array::from_fn(|_| Vec::with_capacity(counters));
        for summary in summaries {
            let base = values.len();
            let used = summary.entries.last().map_or(0, |e| (e.start + e.len) as usize);
            values.extend_from_slice(&summary.arena[..used]);
            for e in &summary.entries {
                // The arena holds the keys end to end, in the entries' order (see `prune`).
                debug_assert_eq!(base + e.start as usize, *offsets.last().expect("starts with 0") as usize);
                offsets.push(
                    i32::try_from(base + (e.start + e.len) as usize)
                        .map_err(|_| datafusion::error::DataFusionError::Execution(format!("{NAME}: state keys over 2 GiB")))?,
                );
                let c = e.counter;
                for (column, value) in counter_columns.iter_mut().zip([c.bytes, c.error, c.packets, c.records]) {
                    column.push(value);
                }
            }
        }
        let keys = BinaryArray::try_new(OffsetBuffer::new(offsets.into()), values.into(), None)?;
        let mut columns: Vec<ArrayRef> = vec![Arc::new(keys)];
        columns.extend(counter_columns.into_iter().map(|c| Arc::new(UInt64Array::from(c)) as ArrayRef));
        Ok(vec![Arc::new(bounds), Arc::new(lists(state_entry(), columns, summaries.iter().map(Summary::len).collect())?)])
    }

    /// Result lists for `summaries`: keys back in their columns' types, largest first.
    fn evaluate_of(&self, summaries: &[Summary]) -> Result<ArrayRef> {
        let parser = self.keys.parser();
        let ranked = Ranked::of(summaries);
        let mut columns = self.keys.convert_rows(ranked.keys.iter().map(|k| parser.parse(k)))?;
        columns.push(ranked.column(|c| c.bytes));
        columns.push(ranked.column(|c| c.packets));
        let records = ranked.counters.iter().map(|c| i64::try_from(c.records).unwrap_or(i64::MAX));
        columns.push(Arc::new(Int64Array::from_iter_values(records)));
        columns.push(ranked.column(|c| c.error));
        Ok(Arc::new(lists(self.result_entry.clone(), columns, ranked.lengths)?))
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.keys.size() + self.summaries.iter().map(Summary::size).sum::<usize>()
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.update(values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let summaries = Self::pruned(self.capacity, emit_to.take_needed(&mut self.summaries));
        self.evaluate_of(&summaries)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Self::state_of(&Self::pruned(self.capacity, emit_to.take_needed(&mut self.summaries)))
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> Result<()> {
        self.merge(values, group_indices, total_num_groups)
    }

    /// Each row as its own exact summary (DataFusion asks when it skips partial aggregation).
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> Result<Vec<ArrayRef>> {
        let rows = self.keys.convert_columns(&values[FIXED_ARGS..])?;
        let summaries: Vec<Summary> = (0..rows.num_rows())
            .map(|i| {
                let mut summary = Summary::default();
                if !opt_filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                    let value = |a: &ArrayRef| {
                        let a = a.as_primitive::<UInt64Type>();
                        if a.is_null(i) { 0 } else { a.value(i) }
                    };
                    summary.add(rows.row(i).as_ref(), value(&values[1]), value(&values[2]));
                }
                summary
            })
            .collect();
        Self::state_of(&summaries)
    }

    fn size(&self) -> usize {
        Groups::size(self)
    }
}

/// The same aggregate for one group (DataFusion's fallback without GROUP BY).
struct OneGroup(Groups);

impl std::fmt::Debug for OneGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{NAME}(capacity {})", self.0.capacity)
    }
}

impl Accumulator for OneGroup {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        self.0.update(values, &vec![0; rows], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.summaries.resize_with(1, Summary::default);
        self.0.summaries[0].prune(self.0.capacity);
        ScalarValue::try_from_array(&self.0.evaluate_of(&self.0.summaries)?, 0)
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.summaries.resize_with(1, Summary::default);
        self.0.summaries[0].prune(self.0.capacity);
        Groups::state_of(&self.0.summaries)?.iter().map(|a| ScalarValue::try_from_array(a, 0)).collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |v| v.len());
        self.0.merge(states, &vec![0; rows], 1)
    }
}

#[cfg(test)]
impl Groups {
    /// An aggregation of `capacity` over keys of `key_types`, without a planned expression.
    fn for_test(capacity: usize, key_types: &[DataType]) -> Self {
        let keys = RowConverter::new(key_types.iter().map(|t| SortField::new(t.clone())).collect()).unwrap();
        let fields: Vec<FieldRef> =
            key_types.iter().enumerate().map(|(i, t)| Arc::new(Field::new(format!("k{i}"), t.clone(), true))).collect();
        Self { capacity, keys, result_entry: result_entry(&fields), summaries: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use datafusion::arrow::array::{RecordBatch, StringArray, UInt32Array};
    use datafusion::arrow::datatypes::{Int64Type, Schema, UInt32Type};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;

    use super::*;

    /// A record: (key, bytes, packets).
    type Rec = (u32, u64, u64);

    fn columns(records: &[Rec]) -> Vec<ArrayRef> {
        vec![
            Arc::new(Int64Array::from(vec![0; records.len()])),
            Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.1))),
            Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.2))),
            Arc::new(UInt32Array::from_iter_values(records.iter().map(|r| r.0))),
        ]
    }

    /// One batch's state, as a partial aggregate emits it.
    fn partial(capacity: usize, records: &[Rec]) -> Vec<ArrayRef> {
        let mut groups = Groups::for_test(capacity, &[DataType::UInt32]);
        groups.update_batch(&columns(records), &vec![0; records.len()], None, 1).unwrap();
        groups.state(EmitTo::All).unwrap()
    }

    /// The states merged in one batch, as a reduce or final aggregate does.
    fn merged(capacity: usize, states: &[&Vec<ArrayRef>]) -> Groups {
        let mut groups = Groups::for_test(capacity, &[DataType::UInt32]);
        let column = |i: usize| {
            let parts: Vec<&dyn Array> = states.iter().map(|s| s[i].as_ref()).collect();
            datafusion::arrow::compute::concat(&parts).unwrap()
        };
        groups.merge_batch(&[column(0), column(1)], &vec![0; states.len()], 1).unwrap();
        groups
    }

    /// What the result lists: key → (bytes, packets, records, error), and the bound.
    fn listed(groups: &mut Groups) -> (HashMap<u32, (u64, u64, i64, u64)>, u64) {
        groups.summaries.resize_with(1, Summary::default);
        let bound = groups.summaries[0].bound;
        let result = groups.evaluate(EmitTo::All).unwrap();
        let entries = result.as_list::<i32>().value(0);
        let entries = entries.as_struct();
        let (keys, bytes, packets, records, errors) = (
            entries.column(0).as_primitive::<UInt32Type>(),
            entries.column(1).as_primitive::<UInt64Type>(),
            entries.column(2).as_primitive::<UInt64Type>(),
            entries.column(3).as_primitive::<Int64Type>(),
            entries.column(4).as_primitive::<UInt64Type>(),
        );
        let out: HashMap<u32, (u64, u64, i64, u64)> =
            (0..entries.len()).map(|i| (keys.value(i), (bytes.value(i), packets.value(i), records.value(i), errors.value(i)))).collect();
        assert_eq!(out.len(), entries.len(), "each key listed once");
        let order: Vec<(u64, u32)> = (0..entries.len()).map(|i| (bytes.value(i), keys.value(i))).collect();
        assert!(order.windows(2).all(|w| w[0].0 > w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)), "largest first: {order:?}");
        (out, bound)
    }

    /// Cuts `records` at `cuts`, summarises each part, and merges the parts in the tree `picks`
    /// chooses (each pick merges two or three states into one, as compaction, corrections and
    /// the site stage do), with an empty state among them.
    fn through_cuts_and_merges(capacity: usize, records: &[Rec], cuts: &[usize], picks: &[(usize, usize, bool)]) -> Groups {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (records.len() + 1)).collect();
        bounds.extend([0, records.len()]);
        bounds.sort_unstable();
        let mut states: Vec<Vec<ArrayRef>> = bounds.windows(2).map(|w| partial(capacity, &records[w[0]..w[1]])).collect();
        states.push(partial(capacity, &[]));
        let mut picks = picks.iter().cycle();
        while states.len() > 1 {
            // Two or three at a time (a reduce merges many states in one batch).
            let &(a, b, three) = picks.next().unwrap();
            let mut some = vec![states.swap_remove(a % states.len()), states.swap_remove(b % states.len())];
            if three && !states.is_empty() {
                some.push(states.swap_remove(0));
            }
            states.push(merged(capacity, &some.iter().collect::<Vec<_>>()).state(EmitTo::All).unwrap());
        }
        merged(capacity, &[&states[0]])
    }

    /// Checks every promise of the module doc against the exact counts.
    fn check_guarantee(capacity: usize, records: &[Rec], groups: &mut Groups) -> Result<(), TestCaseError> {
        let mut truth: HashMap<u32, (u64, u64, i64)> = HashMap::new();
        for &(k, b, p) in records {
            let t = truth.entry(k).or_default();
            *t = (t.0 + b, t.1 + p, t.2 + 1);
        }
        let n: u64 = records.iter().map(|r| r.1).sum();
        let (listed, bound) = listed(groups);
        prop_assert!(listed.len() <= capacity);
        prop_assert!(bound as u128 * capacity as u128 <= n as u128, "bound {bound} > N/m ({n}/{capacity})");
        for (key, &(bytes, packets, records, error)) in &listed {
            let (f, p, r) = truth.get(key).copied().unwrap_or_default();
            prop_assert!(f <= bytes && bytes - error <= f, "key {key}: true {f}, listed {bytes} - {error}");
            prop_assert!(error <= bound.max(error) && error as u128 * capacity as u128 <= n as u128);
            prop_assert!(packets <= p && records <= r);
        }
        for (key, &(f, p, r)) in &truth {
            match listed.get(key) {
                Some(_) => {}
                None => {
                    prop_assert!(f <= bound, "key {key} ({f} bytes) missing, bound {bound}");
                    prop_assert!(f as u128 * capacity as u128 <= n as u128, "key {key} above N/m missing");
                }
            }
            if truth.len() <= capacity {
                prop_assert_eq!(listed.get(key), Some(&(f, p, r, 0)), "at most `capacity` keys: exact");
            }
        }
        Ok(())
    }

    /// Zipf (s = 1.1) over `keys` keys, by inverse CDF of `u` in [0, 1).
    fn zipf(keys: u32, u: f64) -> u32 {
        let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / f64::from(k).powf(1.1)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        for (i, w) in weights.iter().enumerate() {
            acc += w / total;
            if u < acc {
                return i as u32;
            }
        }
        keys - 1
    }

    fn stream() -> impl Strategy<Value = Vec<Rec>> {
        let uniform = (1u32..400).prop_flat_map(|keys| proptest::collection::vec((0..keys, 0u64..1500, 0u64..5), 0..600));
        let zipf = proptest::collection::vec((0.0f64..1.0, 1u64..1500, 0u64..5), 0..600)
            .prop_map(|v| v.into_iter().map(|(u, b, p)| (zipf(500, u), b, p)).collect());
        // m + 1 keys in turn (every arrival evicts), then one key heavy only at the end.
        let adversarial = (1u32..20, 1usize..40, 1u64..100).prop_map(|(keys, rounds, heavy)| {
            let mut v: Vec<Rec> = (0..rounds).flat_map(|_| (0..keys).map(|k| (k, 10, 1))).collect();
            v.extend((0..heavy).map(|_| (1000, 10, 1)));
            v
        });
        prop_oneof![uniform, zipf, adversarial]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        /// Uniform, Zipf and adversarial streams, any cuts, any merge tree: every listed figure
        /// is within its stated error of the exact count, every key above N/m is listed, and a
        /// stream of at most `capacity` keys comes out exact.
        #[test]
        fn the_summary_keeps_its_guarantee_whatever_the_cuts_and_merges(
            capacity in prop_oneof![Just(1usize), Just(4), Just(16), Just(100)],
            records in stream(),
            cuts in proptest::collection::vec(0usize..1000, 0..12),
            picks in proptest::collection::vec((0usize..100, 0usize..100, any::<bool>()), 1..8),
        ) {
            let mut groups = through_cuts_and_merges(capacity, &records, &cuts, &picks);
            check_guarantee(capacity, &records, &mut groups)?;
        }
    }

    #[test]
    fn a_state_merged_into_nothing_is_itself_and_rows_as_states_equal_the_update() {
        let records: Vec<Rec> = (0..500).map(|i| (i % 37, u64::from(i * 7 % 101), 1)).collect();
        let state = partial(8, &records);
        assert_eq!(merged(8, &[&state]).state(EmitTo::All).unwrap(), state);
        let groups = Groups::for_test(8, &[DataType::UInt32]);
        let as_states = groups.convert_to_state(&columns(&records), None).unwrap();
        let mut from_rows = Groups::for_test(8, &[DataType::UInt32]);
        from_rows.merge_batch(&as_states, &vec![0; records.len()], 1).unwrap();
        let mut updated = Groups::for_test(8, &[DataType::UInt32]);
        updated.update_batch(&columns(&records), &vec![0; records.len()], None, 1).unwrap();
        // One exact summary per row, merged, is Space-Saving record by record: within the bounds,
        // not necessarily equal to the batch's.
        let (mut a, mut b) = (from_rows, updated);
        check_guarantee(8, &records, &mut a).unwrap();
        check_guarantee(8, &records, &mut b).unwrap();
    }

    /// The SQL of `pipelines/hagiang/top_talkers.sql`'s shape: one row per listed key, the keys
    /// in their own types, exact while a group has at most `capacity` keys.
    #[tokio::test]
    async fn sql_unnests_the_listed_keys_into_rows() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, true),
            Field::new("packets", DataType::UInt64, false),
            Field::new("peer", DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)), false),
            Field::new("proto", DataType::UInt8, false),
        ]));
        let peers: datafusion::arrow::array::DictionaryArray<datafusion::arrow::datatypes::Int32Type> =
            vec!["x", "y", "x", "z", "x", "y"].into_iter().collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "a", "a", "a", "b", "b"])),
                Arc::new(UInt64Array::from(vec![Some(10), Some(5), Some(7), None, Some(1), Some(2)])),
                Arc::new(UInt64Array::from(vec![1, 1, 1, 1, 1, 1])),
                Arc::new(peers),
                Arc::new(datafusion::arrow::array::UInt8Array::from(vec![6, 6, 6, 17, 6, 6])),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_udaf(udaf());
        ctx.register_table("f", Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())).unwrap();
        let sql = "SELECT site, t.peer AS peer, t.proto AS proto, t.bytes AS bytes, t.records AS records, t.error AS error \
                   FROM (SELECT site, unnest(heavy_hitters(5, bytes, packets, peer, proto)) AS t FROM f GROUP BY site) \
                   ORDER BY site, bytes DESC";
        let rows = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
        let want = "\
+------+------+-------+-------+---------+-------+
| site | peer | proto | bytes | records | error |
+------+------+-------+-------+---------+-------+
| a    | x    | 6     | 17    | 2       | 0     |
| a    | y    | 6     | 5     | 1       | 0     |
| a    | z    | 17    | 0     | 1       | 0     |
| b    | y    | 6     | 2     | 1       | 0     |
| b    | x    | 6     | 1     | 1       | 0     |
+------+------+-------+-------+---------+-------+";
        assert_eq!(text, want);
        for bad in
            ["heavy_hitters(0, bytes, packets, peer)", "heavy_hitters(bytes, bytes, packets, peer)", "heavy_hitters(5, bytes, packets)"]
        {
            let err = match ctx.sql(&format!("SELECT site, {bad} FROM f GROUP BY site")).await {
                Ok(frame) => frame.collect().await.unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("heavy_hitters"), "{bad}: {err}");
        }
    }
}
