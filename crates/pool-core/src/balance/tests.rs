use std::collections::HashMap;

use proptest::prelude::*;
use proptest::strategy::Strategy as _;

use super::Strategy;
use super::*;

#[derive(Clone, Copy, Debug)]
struct Ep {
    in_flight: u32,
    rtt_ns: u64,
    health: f64,
    up: bool,
}

impl Ep {
    fn load(in_flight: u32) -> Self {
        Self { in_flight, rtt_ns: 0, health: 1.0, up: true }
    }
    fn down() -> Self {
        Self { up: false, ..Self::load(0) }
    }
    fn health(health: f64) -> Self {
        Self { health, ..Self::load(0) }
    }
    fn rtt_ms(ms: u64, in_flight: u32) -> Self {
        Self { rtt_ns: ms * 1_000_000, ..Self::load(in_flight) }
    }
}

impl Load for Ep {
    fn in_flight(&self) -> u32 {
        self.in_flight
    }
    fn rtt_estimate_ns(&self) -> u64 {
        self.rtt_ns
    }
    fn health_score(&self) -> f64 {
        self.health
    }
}

fn up(e: &Ep) -> bool {
    e.up
}

/// How often each index was picked in `n` picks.
fn histogram(b: &Balancer, items: &[Ep], n: usize) -> HashMap<usize, usize> {
    let mut h = HashMap::new();
    for _ in 0..n {
        *h.entry(b.pick(items, up).expect("something eligible")).or_default() += 1;
    }
    h
}

#[test]
fn default_strategy_is_power_of_two_choices() {
    assert_eq!(Strategy::default(), Strategy::PowerOfTwoChoices);
    assert_eq!(Balancer::new(Strategy::default()).strategy(), Strategy::PowerOfTwoChoices);
}

#[test]
fn strategies_deserialize_from_kebab_case() {
    use serde::de::{IntoDeserializer, value::Error};
    let names =
        ["round-robin", "least-connections", "health-based", "random", "power-of-two-choices", "peak-ewma"];
    for (name, want) in names.into_iter().zip(Strategy::ALL) {
        let d: serde::de::value::StrDeserializer<'_, Error> = name.into_deserializer();
        assert_eq!(Strategy::deserialize(d).unwrap(), want);
    }
}

#[test]
fn balancer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Balancer>();
}

#[test]
fn every_strategy_returns_none_for_an_empty_or_all_ineligible_list() {
    for s in Strategy::ALL {
        let b = Balancer::new(s);
        assert_eq!(b.pick::<Ep>(&[], up), None, "{s:?}");
        assert_eq!(b.pick(&[Ep::down(), Ep::down()], up), None, "{s:?}");
    }
}

#[test]
fn every_strategy_picks_a_single_eligible_item() {
    for s in Strategy::ALL {
        let b = Balancer::new(s);
        assert_eq!(b.pick(&[Ep::load(3)], up), Some(0), "{s:?}");
        assert_eq!(b.pick(&[Ep::down()], up), None, "{s:?}");
    }
}

#[test]
fn round_robin_cycles_in_order() {
    let b = Balancer::new(Strategy::RoundRobin);
    let items = [Ep::load(0); 4];
    let picks: Vec<_> = (0..8).map(|_| b.pick(&items, up).unwrap()).collect();
    assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
}

#[test]
fn round_robin_skips_ineligible_items_to_the_next_eligible() {
    let b = Balancer::new(Strategy::RoundRobin);
    let items = [Ep::load(0), Ep::down(), Ep::load(0)];
    let picks: Vec<_> = (0..6).map(|_| b.pick(&items, up).unwrap()).collect();
    assert_eq!(picks, [0, 2, 2, 0, 2, 2]);
}

#[test]
fn least_connections_picks_the_least_loaded_and_breaks_ties_randomly() {
    let b = Balancer::seeded(Strategy::LeastConnections, 1);
    let items = [Ep::load(5), Ep::load(3), Ep::load(7), Ep::load(3)];
    let h = histogram(&b, &items, 1_000);
    assert_eq!(h.keys().copied().collect::<std::collections::BTreeSet<_>>(), [1, 3].into());
    assert!(h[&1] > 200 && h[&3] > 200, "{h:?}");
}

#[test]
fn least_connections_ignores_ineligible_items() {
    let b = Balancer::new(Strategy::LeastConnections);
    let items = [Ep::load(5), Ep { up: false, ..Ep::load(0) }, Ep::load(2)];
    for _ in 0..100 {
        assert_eq!(b.pick(&items, up), Some(2));
    }
}

#[test]
fn health_based_weights_by_health_score() {
    let b = Balancer::seeded(Strategy::HealthBased, 7);
    let items = [Ep::health(1.0), Ep::health(0.0), Ep::health(0.5)];
    let h = histogram(&b, &items, 10_000);
    assert!(!h.contains_key(&1), "a zero-weight item was picked: {h:?}");
    let share = h[&0] as f64 / 10_000.0;
    assert!((share - 2.0 / 3.0).abs() < 0.03, "{h:?}");
}

#[test]
fn health_based_is_uniform_among_eligible_when_all_weights_are_zero() {
    let b = Balancer::seeded(Strategy::HealthBased, 7);
    let items =
        [Ep::health(0.0), Ep { up: false, ..Ep::health(0.0) }, Ep::health(f64::NAN), Ep::health(-1.0)];
    let h = histogram(&b, &items, 9_000);
    assert!(!h.contains_key(&1));
    for i in [0, 2, 3] {
        assert!((2_700..3_300).contains(&h[&i]), "{h:?}");
    }
}

#[test]
fn random_is_roughly_uniform() {
    let b = Balancer::seeded(Strategy::Random, 11);
    let h = histogram(&b, &[Ep::load(0); 4], 8_000);
    for i in 0..4 {
        assert!((1_800..2_200).contains(&h[&i]), "{h:?}");
    }
}

#[test]
fn random_moves_forward_from_an_ineligible_draw() {
    let b = Balancer::seeded(Strategy::Random, 11);
    let items = [Ep::down(), Ep::load(0), Ep::down(), Ep::load(0)];
    let h = histogram(&b, &items, 4_000);
    assert_eq!(h.len(), 2);
    assert!((1_800..2_200).contains(&h[&1]), "{h:?}");
}

#[test]
fn p2c_never_picks_the_more_loaded_of_two() {
    let items = [Ep::load(5), Ep::load(1)];
    for b in [Balancer::new(Strategy::PowerOfTwoChoices), Balancer::seeded(Strategy::PowerOfTwoChoices, 3)] {
        for _ in 0..1_000 {
            assert_eq!(b.pick(&items, up), Some(1));
        }
    }
}

#[test]
fn p2c_takes_the_eligible_one_of_two() {
    let b = Balancer::new(Strategy::PowerOfTwoChoices);
    let items = [Ep::load(0), Ep { up: false, ..Ep::load(0) }];
    for _ in 0..100 {
        assert_eq!(b.pick(&items, up), Some(0));
    }
}

#[test]
fn p2c_sends_the_majority_to_the_least_loaded() {
    // A 100-load item wins only when both draws are 100s: 2 of the 12 ordered pairs.
    let b = Balancer::seeded(Strategy::PowerOfTwoChoices, 2024);
    let items = [Ep::load(0), Ep::load(0), Ep::load(100), Ep::load(100)];
    let h = histogram(&b, &items, 10_000);
    let idle = h.get(&0).unwrap_or(&0) + h.get(&1).unwrap_or(&0);
    assert!(idle >= 8_000, "expected ≈ 5/6 on the idle items: {h:?}");
    assert!(h[&0] >= 3_500 && h[&1] >= 3_500, "idle items share evenly: {h:?}");
    assert!(h[&2] <= 1_000 && h[&3] <= 1_000, "each loaded item ≈ 1/12: {h:?}");
}

#[test]
fn p2c_on_a_mostly_ineligible_list_falls_back_to_the_least_loaded_eligible() {
    let b = Balancer::seeded(Strategy::PowerOfTwoChoices, 5);
    let mut items = vec![Ep::down(); 1_000];
    items[10] = Ep::load(9);
    items[900] = Ep::load(1);
    let h = histogram(&b, &items, 2_000);
    // Only a draw that lands on item 10 (≈ 0.2 % per draw) can choose it.
    assert!(h[&900] > 1_950, "{h:?}");
}

#[test]
fn peak_ewma_prefers_the_lower_rtt_times_load() {
    let b = Balancer::new(Strategy::PeakEwma);
    // Costs: 10 ms × 1 = 10 ms against 1 ms × 4 = 4 ms.
    let items = [Ep::rtt_ms(10, 0), Ep::rtt_ms(1, 3)];
    for _ in 0..1_000 {
        assert_eq!(b.pick(&items, up), Some(1));
    }
}

#[test]
fn peak_ewma_charges_default_rtt_to_candidates_without_an_estimate() {
    let items = [Ep::rtt_ms(0, 0), Ep::rtt_ms(40, 0)];
    let b = Balancer::new(Strategy::PeakEwma);
    for _ in 0..100 {
        assert_eq!(b.pick(&items, up), Some(0), "30 ms default beats 40 ms");
    }
    let b = Balancer::new(Strategy::PeakEwma).with_default_rtt(Duration::from_millis(50));
    for _ in 0..100 {
        assert_eq!(b.pick(&items, up), Some(1), "50 ms default loses to 40 ms");
    }
}

#[test]
fn seeded_balancers_are_reproducible() {
    let items: Vec<_> = (0..7)
        .map(|i| Ep { in_flight: i % 3, rtt_ns: u64::from(i) * 1_000, health: 0.5, up: i != 4 })
        .collect();
    for s in Strategy::ALL {
        let run = || {
            let b = Balancer::seeded(s, 99);
            (0..200).map(|_| b.pick(&items, up)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run(), "{s:?}");
    }
}

#[test]
fn different_seeds_give_different_sequences() {
    let items = [Ep::load(0); 16];
    let run = |seed| {
        let b = Balancer::seeded(Strategy::Random, seed);
        (0..50).map(|_| b.pick(&items, up)).collect::<Vec<_>>()
    };
    assert_ne!(run(1), run(2));
}

#[test]
fn one_balancer_is_shared_across_threads() {
    let items: Vec<_> = (0..8).map(Ep::load).collect();
    for s in Strategy::ALL {
        let b = Balancer::new(s);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        assert!(b.pick(&items, up).is_some());
                    }
                });
            }
        });
    }
}

#[test]
fn references_and_arcs_are_loads_too() {
    let owned = [Ep::load(3), Ep::load(1)];
    let refs: Vec<&Ep> = owned.iter().collect();
    let arcs: Vec<Arc<Ep>> = owned.iter().copied().map(Arc::new).collect();
    let b = Balancer::new(Strategy::LeastConnections);
    assert_eq!(b.pick(&refs, |e| e.up), Some(1));
    assert_eq!(b.pick(&arcs, |e| e.up), Some(1));
}

fn ep() -> impl proptest::strategy::Strategy<Value = Ep> {
    let health = prop_oneof![
        8 => 0.0..=1.0f64,
        1 => Just(0.0),
        1 => Just(f64::NAN),
        1 => Just(-0.5),
        1 => Just(f64::INFINITY),
    ];
    (0u32..6, prop_oneof![Just(0u64), 1u64..1_000], health, any::<bool>())
        .prop_map(|(in_flight, rtt_ns, health, up)| Ep { in_flight, rtt_ns, health, up })
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    proptest::sample::select(Strategy::ALL.to_vec())
}

fn balancer(s: Strategy, seed: Option<u64>) -> Balancer {
    seed.map_or_else(|| Balancer::new(s), |seed| Balancer::seeded(s, seed))
}

proptest! {
    #[test]
    fn pick_returns_an_eligible_index_iff_one_exists(
        s in strategy(),
        seed in proptest::option::of(any::<u64>()),
        items in proptest::collection::vec(ep(), 0..20),
    ) {
        let b = balancer(s, seed);
        let any_up = items.iter().any(|e| e.up);
        for _ in 0..10 {
            match b.pick(&items, up) {
                Some(i) => prop_assert!(i < items.len() && items[i].up, "{:?} picked {}", s, i),
                None => prop_assert!(!any_up, "{:?} found nothing among {:?}", s, items),
            }
        }
    }

    #[test]
    fn p2c_of_two_eligible_always_takes_the_cheaper(
        seed in proptest::option::of(any::<u64>()),
        a in ep(),
        c in ep(),
    ) {
        let items = [Ep { up: true, ..a }, Ep { up: true, ..c }];
        let p2c = balancer(Strategy::PowerOfTwoChoices, seed);
        let i = p2c.pick(&items, up).unwrap();
        prop_assert_eq!(items[i].in_flight, items[0].in_flight.min(items[1].in_flight));
        let ewma = balancer(Strategy::PeakEwma, seed);
        let i = ewma.pick(&items, up).unwrap();
        let cost = |e: &Ep| ewma.peak_ewma_cost(e);
        prop_assert_eq!(cost(&items[i]), cost(&items[0]).min(cost(&items[1])));
    }

    #[test]
    fn least_connections_always_takes_a_minimum(
        seed in proptest::option::of(any::<u64>()),
        items in proptest::collection::vec(ep(), 1..20),
    ) {
        let b = balancer(Strategy::LeastConnections, seed);
        let min = items.iter().filter(|e| e.up).map(|e| e.in_flight).min();
        prop_assert_eq!(b.pick(&items, up).map(|i| items[i].in_flight), min);
    }

    #[test]
    fn two_distinct_draws_are_distinct_and_in_range(seed in any::<u64>(), n in 2usize..50) {
        let rng = rng::Rng::seeded(seed);
        let (a, c) = rng.two_distinct(n);
        prop_assert!(a < n && c < n && a != c);
    }
}

#[test]
fn two_distinct_draws_cover_every_ordered_pair_evenly() {
    let rng = rng::Rng::seeded(17);
    let mut h: HashMap<(usize, usize), usize> = HashMap::new();
    for _ in 0..12_000 {
        *h.entry(rng.two_distinct(4)).or_default() += 1;
    }
    assert_eq!(h.len(), 12);
    assert!(h.values().all(|&v| (850..1_150).contains(&v)), "{h:?}");
}
