//! Helpers shared by the model crate's integration tests. Only test fixtures live here.

use burn::tensor::{Tensor, TensorData};
use starling_model::{Llama, LoraAdapter, LoraConfig, Target};

/// A rank-4, α = 8 adapter on `targets` whose A and B hold a fixed pattern of multiples of `step`
/// (|value| ≤ 8·`step`): B is non-zero, so every gradient path is exercised, and the values are the
/// same on every run.
pub fn patterned_adapter(m: &Llama, targets: &[Target], dropout: f32, step: f32) -> LoraAdapter {
    let mut a = LoraAdapter::new(
        &m.config,
        LoraConfig::new(4, 8.0, dropout, targets).unwrap(),
        &m.device,
        3,
    );
    for (i, t) in a.tensors_mut().into_iter().enumerate() {
        let dims = t.dims();
        let vals: Vec<f32> = (0..dims[0] * dims[1])
            .map(|j| (((i * 131 + j * 7) % 17) as f32 - 8.0) * step)
            .collect();
        *t = Tensor::from_data(TensorData::new(vals, dims), &m.device);
    }
    a
}
