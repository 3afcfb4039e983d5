//! Pools with ratios, component-server style: `--pool NAME=RATIO` gives
//! pool NAME `ceil(workers × ratio)` slots and the jobs of queue NAME; a
//! pool marked `:shared` also takes the excess of the other pools' queues,
//! in pool definition order, after those pools have taken theirs.
//!
//! Worked example, `--workers 10 --pool short=0.3 --pool long=0.3
//! --pool shared=0.4:shared` (3, 3 and 4 slots): with 6 short and 10 long
//! jobs queued, short runs 3 short, long runs 3 long, and shared takes the
//! 3 short left and then 1 long. (component-server's README gives 2 + 2 for
//! this case, which contradicts its own rule; we follow the rule.)

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Kind, Result};

/// One `--pool NAME=RATIO[:shared]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolSpec {
    pub name: String,
    pub ratio: f64,
    pub shared: bool,
}

impl std::str::FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| {
            format!("'{s}' is not a pool: {why} (expected NAME=RATIO or NAME=RATIO:shared)")
        };
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            return Err(bad("the name may have letters, digits, '_', '-' and '.'"));
        }
        let (ratio, shared) = match rest.strip_suffix(":shared") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let ratio: f64 = ratio
            .parse()
            .map_err(|_| bad("the ratio is not a number"))?;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(bad("the ratio must be more than 0 and at most 1"));
        }
        Ok(PoolSpec {
            name: name.to_string(),
            ratio,
            shared,
        })
    }
}

/// A pool as it runs: its slots are `first_slot .. first_slot + slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pool {
    pub name: String,
    pub slots: u32,
    pub first_slot: u32,
    pub shared: bool,
    /// The queues it takes, in order: its own, then (shared pools) the
    /// other pools' in definition order.
    pub queues: Vec<String>,
}

/// The pools for `workers` workers, and warnings for the operator.
///
/// # Errors
///
/// [`Error::is_config`] for ratios that add up to more than 1 (more than
/// every worker) or a pool named twice.
pub(crate) fn plan(specs: &[PoolSpec], workers: usize) -> Result<(Vec<Pool>, Vec<String>)> {
    let default = [PoolSpec {
        name: crate::jobs::DEFAULT_QUEUE.to_string(),
        ratio: 1.0,
        shared: false,
    }];
    let specs = if specs.is_empty() {
        &default[..]
    } else {
        specs
    };
    let config = |why: String| Error::new(Kind::Config, why);
    let total: f64 = specs.iter().map(|s| s.ratio).sum();
    if total > 1.0 + 1e-9 {
        return Err(config(format!(
            "the pools' ratios add up to {total:.2}: more than every worker (at most 1)"
        )));
    }
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(config(format!("pool {} is given twice", s.name)));
        }
    }
    let own: Vec<String> = specs
        .iter()
        .filter(|s| !s.shared)
        .map(|s| s.name.clone())
        .collect();
    let mut pools = Vec::new();
    let mut next = 1u32;
    for s in specs {
        // The epsilon keeps 10 × 0.3 = 3.0000000000000004 at 3.
        let slots = ((workers as f64 * s.ratio) - 1e-9).ceil().max(1.0) as u32;
        let mut queues = vec![s.name.clone()];
        if s.shared {
            queues.extend(own.iter().filter(|q| **q != s.name).cloned());
        }
        pools.push(Pool {
            name: s.name.clone(),
            slots,
            first_slot: next,
            shared: s.shared,
            queues,
        });
        next += slots;
    }
    let used: u32 = pools.iter().map(|p| p.slots).sum();
    let mut warnings = Vec::new();
    if used as usize > workers {
        warnings.push(format!(
            "the pools take {used} slots (each rounded up), more than --workers {workers}: running {used} workers"
        ));
    } else if (used as usize) < workers {
        warnings.push(format!(
            "the pools take {used} of {workers} workers: {} are in no pool and are not started",
            workers - used as usize
        ));
    }
    Ok((pools, warnings))
}

/// The pool of `slot`.
pub(crate) fn pool_of(pools: &[Pool], slot: u32) -> Option<usize> {
    pools
        .iter()
        .position(|p| slot >= p.first_slot && slot < p.first_slot + p.slots)
}

/// Which pool takes how many jobs of which queue now: every non-shared
/// pool takes what it can of its own queue; then every shared pool, in
/// definition order, takes what it can of its queues in order. `free[i]`
/// is pool i's free capacity, `waiting` the jobs each queue has ready.
/// A shared pool goes no further than a queue with nothing ready but a
/// claim under way (`claiming`): that queue may yet have jobs, and its
/// place in the order says they come first (without this, the jobs
/// claimed for a later queue went to the shared pool whenever its claim
/// returned before the earlier queue's).
pub(crate) fn assign(
    pools: &[Pool],
    free: &[usize],
    waiting: &HashMap<String, usize>,
    claiming: &HashSet<String>,
) -> Vec<(usize, String, usize)> {
    let mut left = waiting.clone();
    let mut out = Vec::new();
    let mut take = |i: usize, q: &str, room: &mut usize, left: &mut HashMap<String, usize>| {
        let have = left.get(q).copied().unwrap_or(0);
        let n = have.min(*room);
        if n > 0 {
            out.push((i, q.to_string(), n));
            *room -= n;
            left.insert(q.to_string(), have - n);
        }
    };
    for pass_shared in [false, true] {
        for (i, p) in pools.iter().enumerate() {
            if p.shared != pass_shared {
                continue;
            }
            let mut room = free.get(i).copied().unwrap_or(0);
            for q in &p.queues {
                take(i, q, &mut room, &mut left);
                let empty = left.get(q).copied().unwrap_or(0) == 0;
                if pass_shared && room > 0 && empty && claiming.contains(q) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Vec<Pool> {
        let specs: Vec<PoolSpec> = ["short=0.3", "long=0.3", "shared=0.4:shared"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (pools, warnings) = plan(&specs, 10).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        pools
    }

    fn running(short: usize, long: usize) -> Vec<(String, String, usize)> {
        let pools = example();
        let waiting = HashMap::from([("short".to_string(), short), ("long".to_string(), long)]);
        let free: Vec<usize> = pools.iter().map(|p| p.slots as usize).collect();
        assign(&pools, &free, &waiting, &HashSet::new())
            .into_iter()
            .map(|(i, q, n)| (pools[i].name.clone(), q, n))
            .collect()
    }

    fn row(pool: &str, queue: &str, n: usize) -> (String, String, usize) {
        (pool.into(), queue.into(), n)
    }

    #[test]
    fn slots_are_ceil_of_workers_times_ratio_in_order() {
        let pools = example();
        let slots: Vec<(u32, u32)> = pools.iter().map(|p| (p.first_slot, p.slots)).collect();
        assert_eq!(slots, [(1, 3), (4, 3), (7, 4)]);
        assert_eq!(pools[2].queues, ["shared", "short", "long"]);
        assert_eq!(pool_of(&pools, 3), Some(0));
        assert_eq!(pool_of(&pools, 4), Some(1));
        assert_eq!(pool_of(&pools, 10), Some(2));
        assert_eq!(pool_of(&pools, 11), None);
    }

    #[test]
    fn worked_example_10_short_10_long() {
        assert_eq!(
            running(10, 10),
            [
                row("short", "short", 3),
                row("long", "long", 3),
                row("shared", "short", 4)
            ]
        );
    }

    #[test]
    fn a_shared_pool_waits_for_an_earlier_queue_being_claimed() {
        let pools = example();
        // The short pool took its 3; 5 long jobs are buffered (3 for the
        // long pool, 2 prefetched); short's next claim is under way.
        let free = [0, 3, 4];
        let waiting = HashMap::from([("short".to_string(), 0), ("long".to_string(), 5)]);
        let claiming = HashSet::from(["short".to_string()]);
        let named = |out: Vec<(usize, String, usize)>| -> Vec<(String, String, usize)> {
            out.into_iter()
                .map(|(i, q, n)| (pools[i].name.clone(), q, n))
                .collect()
        };
        assert_eq!(
            named(assign(&pools, &free, &waiting, &claiming)),
            [row("long", "long", 3)]
        );
        // Short turned out dry: the shared pool takes long's.
        assert_eq!(
            named(assign(&pools, &free, &waiting, &HashSet::new())),
            [row("long", "long", 3), row("shared", "long", 2)]
        );
        // Its ready jobs are taken first, then the pool waits again.
        let waiting = HashMap::from([("short".to_string(), 2), ("long".to_string(), 5)]);
        assert_eq!(
            named(assign(&pools, &free, &waiting, &claiming)),
            [row("long", "long", 3), row("shared", "short", 2)]
        );
        // A later queue's claim holds nothing back.
        let claiming = HashSet::from(["long".to_string()]);
        assert_eq!(
            named(assign(&pools, &free, &waiting, &claiming)),
            [
                row("long", "long", 3),
                row("shared", "short", 2),
                row("shared", "long", 2)
            ]
        );
    }

    #[test]
    fn worked_example_2_short_10_long() {
        assert_eq!(
            running(2, 10),
            [
                row("short", "short", 2),
                row("long", "long", 3),
                row("shared", "long", 4)
            ]
        );
    }

    #[test]
    fn worked_example_6_short_10_long() {
        assert_eq!(
            running(6, 10),
            [
                row("short", "short", 3),
                row("long", "long", 3),
                row("shared", "short", 3),
                row("shared", "long", 1)
            ]
        );
    }

    #[test]
    fn without_pools_one_default_pool_has_every_worker() {
        let (pools, warnings) = plan(&[], 4).unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!((pools[0].name.as_str(), pools[0].slots), ("default", 4));
        assert!(warnings.is_empty());
    }

    #[test]
    fn bad_pools_are_refused_and_odd_ones_warned_about() {
        for bad in [
            "x",
            "=0.5",
            "a b=0.5",
            "a=0",
            "a=1.5",
            "a=x",
            "a=0.5:private",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad}");
        }
        let p = |s: &str| s.parse::<PoolSpec>().unwrap();
        let err = plan(&[p("a=0.7"), p("b=0.6")], 10).unwrap_err();
        assert!(err.is_config() && err.to_string().contains("1.30"), "{err}");
        assert!(plan(&[p("a=0.5"), p("a=0.5")], 10).unwrap_err().is_config());
        let (_, w) = plan(&[p("a=0.5"), p("b=0.3")], 10).unwrap();
        assert!(w[0].contains("2 are in no pool"), "{w:?}");
        let (pools, w) = plan(&[p("a=0.5"), p("b=0.5")], 3).unwrap();
        assert_eq!(pools.iter().map(|p| p.slots).sum::<u32>(), 4);
        assert!(w[0].contains("more than --workers 3"), "{w:?}");
    }
}
