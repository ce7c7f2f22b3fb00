//! Tests of the trainer's components that need several of them (devices and layout, memory planning, checkpoints
//! set aside and resumed).

use super::checkpoint::*;
use super::launch::*;
use super::memory::*;
use super::model::*;
use super::records::STEPS_FILE;
use crate::common::run_dir::{checkpoints_dir, list_checkpoints};
use crate::config::TrainConfig;
use lexflow_gpu::{checkpoint, LlamaConfig};
use tch::{Device, Kind};

mod failure_tests {
    use super::*;

    #[test]
    fn auto_recompute_only_when_the_step_would_not_fit() {
        let gib = 1u64 << 30;
        let c1 = LlamaConfig::preset("1b", 128_256).unwrap();
        let state = lexflow_gpu::train_state_bytes(c1.num_params() as u64, 2, 1);
        // 1B, 2 × 4096 tokens on 80 GB: ~23 GiB state + ~18 GiB activations: no recomputation.
        let act2 = activation_bytes(&c1, 2 * 4096, 2);
        assert!(act2 > 10 * gib && act2 < 30 * gib, "{}", act2 / gib);
        assert!(!needs_recompute(state, act2, 80 * gib));
        // 8 × 4096 tokens per micro-batch: activations alone exceed the device.
        let act8 = activation_bytes(&c1, 8 * 4096, 2);
        assert!(needs_recompute(state, act8, 80 * gib));
    }

    #[test]
    fn the_best_checkpoint_is_kept_besides_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let ck = |s: u64| checkpoints_dir(dir.path()).join(format!("step-{s:06}"));
        let left = || -> Vec<u64> {
            list_checkpoints(dir.path())
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        for s in [20u64, 22, 24, 26] {
            std::fs::create_dir_all(ck(s)).unwrap();
        }
        prune_checkpoints(dir.path(), 1, 26, Some(20));
        assert_eq!(left(), vec![20, 26]);
        // Without a best, the same pruning keeps only the newest.
        prune_checkpoints(dir.path(), 1, 26, None);
        assert_eq!(left(), vec![26]);
    }

    #[test]
    fn earlier_runs_and_unusable_checkpoints_are_set_aside_not_pruned_over() {
        let dir = tempfile::tempdir().unwrap();
        let ck = |s: u64| checkpoints_dir(dir.path()).join(format!("step-{s:06}"));
        for s in [10u64, 20, 30] {
            std::fs::create_dir_all(ck(s)).unwrap();
        }
        // Resumed from 20 because 30 does not verify: 30 is renamed, so after writing 22 and pruning to 2, the
        // good 20 and 22 are what is left (counting 30 among the newest would have removed 20).
        set_aside_unusable(&[ck(30)]);
        std::fs::create_dir_all(ck(22)).unwrap();
        prune_checkpoints(dir.path(), 2, 22, None);
        let left: Vec<u64> = list_checkpoints(dir.path())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![20, 22]);

        assert!(checkpoints_dir(dir.path())
            .join("step-000030.unusable")
            .is_dir());
        // A fresh run over it: everything moves to previous/, nothing is lost.
        std::fs::write(dir.path().join(STEPS_FILE), "{}\n").unwrap();
        std::fs::write(dir.path().join("dedup.rank1.jsonl"), "").unwrap();
        let moved = set_aside_previous_run(dir.path()).unwrap();
        assert_eq!(moved.len(), 3);
        assert!(list_checkpoints(dir.path()).is_empty());
        assert!(dir.path().join("previous/checkpoints/step-000022").is_dir());
        assert!(dir.path().join("previous").join(STEPS_FILE).is_file());
        assert!(dir.path().join("previous/dedup.rank1.jsonl").is_file());
        // A run that failed before training left only empty records: not an earlier run, nothing moves.
        std::fs::write(dir.path().join(crate::stages::dedup::LOG_FILE), "").unwrap();
        std::fs::write(dir.path().join(STEPS_FILE), "").unwrap();
        assert!(set_aside_previous_run(dir.path()).unwrap().is_empty());
        // Another earlier run: previous.1, previous/ untouched.
        std::fs::create_dir_all(ck(4)).unwrap();
        set_aside_previous_run(dir.path()).unwrap();
        assert!(dir
            .path()
            .join("previous.1/checkpoints/step-000004")
            .is_dir());
        assert!(dir.path().join("previous/checkpoints/step-000022").is_dir());
    }

    /// One process per rank: one device entry, the kind only (CUDA on LOCAL_RANK); a list of several, which a process
    /// would silently reduce to its first, or a non-device is an error naming the key.
    #[test]
    fn a_process_of_one_rank_takes_one_device_entry() {
        let v = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(process_device(&v(&["cpu"]), 3).unwrap(), Device::Cpu);
        assert_eq!(process_device(&v(&["cuda:0"]), 3).unwrap(), Device::Cuda(3));
        for bad in [&["cpu", "cpu"][..], &["cuda:0", "cuda:1"], &[]] {
            let e = process_device(&v(bad), 0).unwrap_err().to_string();
            assert!(
                e.contains("key `train.devices`") && e.contains("one entry"),
                "{e}"
            );
        }
        let e = process_device(&v(&["gpu"]), 0).unwrap_err().to_string();
        assert!(e.contains("`gpu` is not `cpu` or `cuda:N`"), "{e}");
    }

    #[test]
    fn a_cuda_device_libtorch_does_not_see_is_a_setup_error_naming_the_key() {
        let l = Layout {
            world: 2,
            local: vec![(0, Device::Cpu), (1, Device::Cuda(63))],
            multi_process: false,
        };
        let e = check_devices(&l).unwrap_err().to_string();
        assert!(
            e.contains("train.devices: cuda:63") && e.contains("CUDA device(s)"),
            "{e}"
        );
        // libtorch counts devices through its CUDA backend, which our binaries do not link (`init_cuda`): without
        // loading it first, every GPU run would be refused with "libtorch sees 0 CUDA device(s)".
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            maps.contains("libtorch_cuda.so"),
            "check_devices counted CUDA devices without loading libtorch's CUDA backend"
        );
        let cpu = Layout {
            world: 1,
            local: vec![(0, Device::Cpu)],
            multi_process: false,
        };
        assert!(check_devices(&cpu).is_ok());
    }

    /// The optimizer sharded `shards` ways (ZeRO-2), replicated for 1.
    fn zero2(shards: usize) -> Sharding {
        if shards > 1 {
            Sharding::new(lexflow_gpu::plan::ShardMode::Optimizer, shards, false)
        } else {
            Sharding::REPLICATED
        }
    }

    #[test]
    fn models_that_cannot_fit_are_refused_before_allocating() {
        let gib = 1u64 << 30;
        let c8 = LlamaConfig::preset("8b", 128_256).unwrap();
        let n8 = c8.num_params() as u64;
        // 8B: 20 bytes per parameter, ~150 GiB: not on an 80 GB H100, nor a 141 GB H200.
        let e = check_fits(&c8, 2, 80 * gib, 0, zero2(1), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.model")
                && e.contains("cuda:0")
                && e.contains("train.shard = \"optimizer\"")
                && e.contains("fits from 3 ranks on"),
            "{e}"
        );
        assert!(check_fits(&c8, 2, 141 * gib, 0, zero2(1), true).is_err());
        // Sharded 8 ways: 4 bytes of weights and gradients + 16/8 of optimizer state per parameter (~45 GiB).
        let sharded8 = check_fits(&c8, 2, 80 * gib, 0, zero2(8), true).unwrap();
        let bare = n8 * 4 + n8 * 16 / 8;
        assert!(
            sharded8 >= bare && sharded8 < bare + bare / 100,
            "{sharded8} vs {bare} (+ buffers)"
        );
        // The rank count the hint names is the smallest that fits, and one fewer does not.
        assert!(check_fits(&c8, 2, 80 * gib, 0, zero2(3), true).is_ok());
        assert!(check_fits(&c8, 2, 80 * gib, 0, zero2(2), true).is_err());
        // Sharded 2 ways is still too much (~90 GiB), and the error says what to do.
        let e = check_fits(&c8, 2, 80 * gib, 0, zero2(2), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sharded 2 ways") && e.contains("at least 3 ranks"),
            "{e}"
        );
        // 70B: its bf16 weights and gradients alone (~263 GiB) fit on no GPU, however many ranks share the
        // AdamW state: the error must not send the user looking for more ranks.
        let c70 = LlamaConfig::preset("70b", 128_256).unwrap();
        for shards in [1, 8, 1024] {
            let e = check_fits(&c70, 2, 141 * gib, 0, zero2(shards), true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("weights and gradients alone")
                    && e.contains("more ranks do not help")
                    && !e.contains("at least")
                    && !e.contains("bf16")
                    && e.contains("train.shard = \"full\"")
                    && e.contains("train.offload_optimizer = true"),
                "{e}"
            );
        }
        // Fully sharded with the optimizer offloaded, 70B fits four 180 GiB GPUs (B200); without the offload the
        // error names it.
        use lexflow_gpu::plan::ShardMode::Full;
        assert!(check_fits(&c70, 2, 180 * gib, 0, Sharding::new(Full, 4, true), true).is_ok());
        let e = check_fits(&c70, 2, 180 * gib, 0, Sharding::new(Full, 4, false), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fully sharded 4 ways")
                && (e.contains("train on at least")
                    || e.contains("train.offload_optimizer = true")),
            "{e}"
        );
        // fp32 weights and gradients of 8B (~60 GiB) do not fit a 48 GB GPU however sharded; bf16 ones would.
        let e = check_fits(&c8, 4, 48 * gib, 0, zero2(8), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more ranks do not help") && e.contains("train.dtype = \"bf16\""),
            "{e}"
        );
        let c1 = LlamaConfig::preset("1b", 128_256).unwrap();
        assert!(check_fits(&c1, 2, 80 * gib, 0, zero2(1), true).is_ok());
        assert_eq!(lexflow_gpu::train_state_bytes(10, 4, 1), 10 * 20);
    }

    #[test]
    fn init_from_of_another_shape_than_train_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = LlamaConfig::preset("125m", 128_256).unwrap();
        checkpoint::write_hf_config(dir.path(), &small, Kind::BFloat16).unwrap();
        // The default `model` (tiny) and the matching preset take the directory's shape.
        for model in ["tiny", "125m"] {
            let c = init_config(model, 128_256, dir.path()).unwrap();
            assert_eq!(shape(&c), shape(&small), "{model}");
        }
        let e = init_config("1b", 128_256, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.model = \"1b\"")
                && e.contains("hidden 2048")
                && e.contains("hidden 768")
                && e.contains(&dir.path().display().to_string())
                && e.contains("remove train.model"),
            "{e}"
        );
    }

    #[test]
    fn out_of_memory_gets_a_hint_other_failures_do_not() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from(
            "Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB\\nException raised from malloc at …\\nframe #0 …\")",
        ));
        let e = libtorch_failure(Device::Cuda(0), oom.as_ref()).to_string();
        assert!(
            e.contains("CUDA out of memory") && e.contains("train.micro_batch"),
            "{e}"
        );
        assert!(
            !e.contains("frame #0") && !e.contains("Exception raised"),
            "backtrace kept: {e}"
        );
        let other: Box<dyn std::any::Any + Send> = Box::new("shape mismatch");
        let e = libtorch_failure(Device::Cpu, other.as_ref()).to_string();
        assert!(e.contains("shape mismatch") && !e.contains("hint"), "{e}");
    }
}

mod setup_tests {
    use super::*;

    #[test]
    fn devices_must_match_edges_and_parse() {
        let mut cfg: TrainConfig =
            toml::from_str("devices = [\"cpu\", \"cuda:1\"]\nsteps = 1").unwrap();
        assert!(layout(&cfg, 3).is_err());
        let l = layout(&cfg, 2).unwrap();
        assert_eq!(l.local[1], (1, Device::Cuda(1)));
        cfg.devices = vec!["gpu0".into()];
        assert!(layout(&cfg, 1).is_err());
    }

    #[test]
    fn resume_point_none_without_checkpoints_and_error_when_all_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resume_point(dir.path()).unwrap().is_none());
        let bad = checkpoints_dir(dir.path()).join("step-000002");
        std::fs::create_dir_all(&bad).unwrap();
        let e = resume_point(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("none verifies") && e.contains("step-000002"),
            "{e}"
        );
    }
}

#[test]
fn memory_sizes_parse_with_units_and_bad_ones_say_why() {
    assert_eq!(parse_bytes("180GiB").unwrap(), 180 << 30);
    assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
    assert_eq!(parse_bytes("2TiB").unwrap(), 2 << 40);
    assert_eq!(parse_bytes("1.5TB").unwrap(), 1_500_000_000_000);
    assert_eq!(parse_bytes("4096").unwrap(), 4096);
    let e = parse_bytes("12q").unwrap_err();
    assert!(e.contains("unknown unit") && e.contains("GiB"), "{e}");
    assert!(parse_bytes("GiB").unwrap_err().contains("expected a size"));
}
