# Stage-to-stage batches of sluice.
#
# One NATS message (or one hand-over between chained stages) is one batch, and
# every batch belongs to one key group: the unit of partitioning, ownership and
# exactly-once bookkeeping (see docs/architecture.md). Every record carries its
# lineage: where in the input it came from, so a receiver can drop what it has
# already applied and a reader can trace a table row back to its uploads.
#
# Compatibility: fields are only ever added at the end of a struct, with a new
# ordinal; `formatVersion` changes only for a change that old readers must
# refuse (they reject the batch with a typed error rather than misread it).
#
# Regenerate the Rust code with `just schemas` (needs the `capnp` compiler);
# the generated file is checked in so that a build needs no compiler.

@0xc3f1b7a2d94e6f01;

# Where a record came from: a Kafka partition and offset, or, for file input,
# partition 0 and the zero-based line number.
struct Lineage {
  partition @0 :UInt32;
  offset @1 :UInt64;
}

# Why a message or an event was rejected (SPEC section 2, in rule order).
enum RejectReason {
  malformed @0;
  missingField @1;
  unknownApp @2;
  duplicate @3;
  unknownEvent @4;
  badTimestamp @5;
  badValue @6;
}

enum EventKind {
  launch @0;
  page @1;
  custom @2;
  pay @3;
  terminate @4;
}

# ---------------------------------------------------------------- source -> enrich

# One event of an upload that passed rules 1-2, already checked against rules
# 5-7. Rejected events travel too (as `rejected`), because they may only be
# counted once enrich has accepted their message (rules 3-4).
struct RawEvent {
  ts @0 :Int64;
  union {
    rejected @1 :RejectReason;
    launch @2 :Void;
    page @3 :Int64;          # dur, seconds
    terminate @4 :Int64;     # dur, seconds
    custom @5 :Text;         # event id
    pay :group {
      amount @6 :Int64;      # minor units
      currency @7 :Text;
    }
  }
}

# An upload in the unified (v2) model, or a reject of rules 1-2.
struct RawUpload {
  lineage @0 :Lineage;
  union {
    rejected @1 :RejectReason;
    accepted :group {
      mid @2 :Text;
      app @3 :Text;
      dev @4 :Text;
      os @5 :Text;           # absent (null) when not a string
      channel @6 :Text;      # absent (null) when not a string
      ip @7 :Text;           # absent (null) when not a string
      sent @8 :Int64;        # ms since the epoch (saturated for a v1 time out of range)
      events @9 :List(RawEvent);
    }
  }
}

struct RawBatch {
  formatVersion @0 :UInt16;
  keyGroup @1 :UInt16;
  uploads @2 :List(RawUpload);
}

# ---------------------------------------------------------------- enrich -> window

# The dimensions an accepted message gives all its events.
struct Dimensions {
  os @0 :Text;
  channel @1 :Text;
  country @2 :Text;
}

struct EnrichedEvent {
  index @0 :UInt32;          # position of the event in its upload
  ts @1 :Int64;
  union {
    launch @2 :Void;
    page @3 :Int64;
    terminate @4 :Int64;
    custom @5 :Text;
    pay :group {
      amount @6 :Int64;
      currency @7 :Text;
    }
  }
}

# An accepted upload's accepted events, with the dimensions they share.
struct EnrichedUpload {
  lineage @0 :Lineage;
  app @1 :Text;
  dev @2 :Text;
  dimensions @3 :Dimensions;
  events @4 :List(EnrichedEvent);
}

# The device registry moved a device's first event: count it in `into` and,
# when it was counted before, retract it from `outOf`.
struct FirstEventMove {
  lineage @0 :Lineage;
  app @1 :Text;
  dev @2 :Text;
  outOfDay @3 :Int64;        # local day number; meaningful only with hasOutOf
  outOf @4 :Dimensions;
  hasOutOf @5 :Bool;         # false when the device is new
  intoDay @6 :Int64;         # local day number (days since 1970-01-01, UTC+08:00)
  into @7 :Dimensions;
}

struct RejectCount {
  reason @0 :RejectReason;
  count @1 :UInt64;
}

struct EnrichedBatch {
  formatVersion @0 :UInt16;
  keyGroup @1 :UInt16;
  uploads @2 :List(EnrichedUpload);
  firstEventMoves @3 :List(FirstEventMove);
  rejects @4 :List(RejectCount);
  # The input this batch accounts for: how many raw records (accepted or
  # not), and the lineage of the last. A receiver drops a batch at or below
  # its lineage frontier (distributed mode: a replayed batch).
  inputRecords @5 :UInt64;
  inputLast @6 :Lineage;
}

# ---------------------------------------------------------------- window -> sink

# The absolute value of one table key's partial row within one key group, at a
# version. The sink keeps the newest version per (table, key, key group) and
# adds the partials of a key when it answers: re-applying a row is harmless.
struct PartialRow {
  version @0 :UInt64;
  union {
    daily :group {
      app @1 :Text;
      day @2 :Int64;         # local day number
      dimensions @3 :Dimensions;
      events @4 :UInt64;
      launches @5 :UInt64;
      activeDevices @6 :UInt64;
      newDevices @7 :Int64;  # may be transiently negative while retractions travel
      playtimeS @8 :Text;    # decimal integer: sums may pass 64 bits
      playtimeHist @9 :List(UInt64);
      payers @10 :UInt64;
      revenue @11 :List(Revenue);
    }
    sessionsPerDevice :group {
      app @12 :Text;
      day @13 :Int64;
      buckets @14 :List(UInt64);
    }
    customEvents :group {
      app @15 :Text;
      day @16 :Int64;
      eventId @17 :Text;
      count @18 :UInt64;
      devices @19 :UInt64;
    }
    minuteBlock :group {     # the minute rows of one app in one local hour
      app @20 :Text;
      hour @21 :Int64;       # local hour number (hours since 1970-01-01T00:00, UTC+08:00)
      cells @22 :List(MinuteCell);
    }
    rejects :group {
      reason @23 :RejectReason;
      count @24 :UInt64;
    }
  }
}

# One minute of a minute block (sorted by minute, at most one per minute).
struct MinuteCell {
  minute @0 :Int64;          # local minute number
  events @1 :UInt64;
  launches @2 :UInt64;
  revenueCny @3 :Text;       # decimal integer
}

struct Revenue {
  currency @0 :Text;
  amount @1 :Text;           # decimal integer
}

struct RowBatch {
  formatVersion @0 :UInt16;
  keyGroup @1 :UInt16;
  rows @2 :List(PartialRow);
  # Input records the key group's rows account for so far (absolute, only
  # grows): the sink's end-to-end progress.
  coveredRecords @3 :UInt64;
}
