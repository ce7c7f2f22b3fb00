use std::num::NonZeroUsize;

use crate::edge::{edge, EdgeReceiver, EdgeSender};
use crate::topology::{ActorContext, ActorError, Topology};

/// A parallel map that preserves order: a dispatcher deals input messages round-robin to `workers` worker actors, and a
/// collector takes their outputs round-robin in the same order. Every worker has its own bounded in/out edges
/// (`capacity` each), so the pool holds at most `2 * workers * capacity + 2` messages, and the output sequence is the
/// same for any number of workers. `make_worker(i)` builds worker `i`'s state (e.g. its own tokenizer).
pub fn ordered_pool<In, Out, W, F>(
    topo: &mut Topology,
    name: &str,
    workers: NonZeroUsize,
    capacity: NonZeroUsize,
    input: EdgeReceiver<In>,
    output: EdgeSender<Out>,
    mut make_worker: F,
) where
    In: Send + 'static,
    Out: Send + 'static,
    W: FnMut(&ActorContext, In) -> Result<Out, ActorError> + Send + 'static,
    F: FnMut(usize) -> W,
{
    let n = workers.get();
    let mut to_workers = Vec::with_capacity(n);
    let mut from_workers = Vec::with_capacity(n);
    for i in 0..n {
        let (wtx, wrx) = edge::<In>(&format!("{name}.dispatch->{name}-{i}"), capacity);
        let (otx, orx) = edge::<Out>(&format!("{name}-{i}->{name}.collect"), capacity);
        to_workers.push(wtx);
        from_workers.push(orx);
        let mut f = make_worker(i);
        topo.spawn(format!("{name}-{i}"), move |ctx| {
            for item in wrx.iter() {
                let out = f(ctx, item)?;
                if otx.send(out).is_err() {
                    break; // downstream finished early
                }
            }
            Ok(())
        });
    }
    topo.spawn(format!("{name}.dispatch"), move |_ctx| {
        for (k, item) in input.iter().enumerate() {
            if to_workers[k % n].send(item).is_err() {
                break;
            }
        }
        Ok(())
    });
    topo.spawn(format!("{name}.collect"), move |_ctx| {
        let mut k = 0usize;
        loop {
            match from_workers[k % n].recv() {
                Ok(out) => {
                    if output.send(out).is_err() {
                        break;
                    }
                }
                // Worker k%n is done: since items were dealt round-robin, every later worker is done too.
                Err(_) => break,
            }
            k += 1;
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shutdown;

    fn run(workers: usize) -> Vec<u64> {
        let mut topo = Topology::new(Shutdown::new());
        let c = NonZeroUsize::new(2).unwrap();
        let (itx, irx) = edge::<u64>(&format!("t{workers}.in"), c);
        let (otx, orx) = edge::<u64>(&format!("t{workers}.out"), c);
        ordered_pool(
            &mut topo,
            &format!("sq{workers}"),
            NonZeroUsize::new(workers).unwrap(),
            c,
            irx,
            otx,
            |i| {
                move |_ctx: &ActorContext, x: u64| {
                    // Uneven work so that workers finish out of order.
                    std::thread::sleep(std::time::Duration::from_micros(
                        ((x * 7 + i as u64) % 5) * 100,
                    ));
                    Ok(x * x)
                }
            },
        );
        topo.spawn("src", move |_| {
            for x in 0..200u64 {
                itx.send(x)?;
            }
            Ok(())
        });
        let h = std::thread::spawn(move || orx.iter().collect::<Vec<_>>());
        topo.join().unwrap();
        h.join().unwrap()
    }

    #[test]
    fn output_order_is_independent_of_worker_count() {
        let want: Vec<u64> = (0..200u64).map(|x| x * x).collect();
        assert_eq!(run(1), want);
        assert_eq!(run(4), want);
    }
}
