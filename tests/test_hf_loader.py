"""The internet loader (flwr-datasets FederatedDataset), exercised on shipped data saved locally."""

import numpy as np
from fedshield.tasks import get_task


def test_federated_dataset_loader_on_a_local_copy(tmp_path):
    import datasets

    train, test = get_task("mnist5k").load()
    rng = np.random.default_rng(0)
    train, test = train.subset(rng.permutation(len(train))), test.subset(rng.permutation(len(test)))

    def raw(s):
        return np.clip(np.rint(s.x[:, 0] * 0.3081 * 255 + 0.1307 * 255), 0, 255).astype(np.uint8)

    for name, split, n in (("train", train, 300), ("test", test, 100)):
        ds = datasets.Dataset.from_dict({"image": raw(split)[:n].tolist(),
                                         "label": split.y[:n].tolist()})
        ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    task = get_task(f"hf:{tmp_path}")
    hf_train, hf_test = task.load()
    assert task.input_shape == (1, 28, 28) and task.num_classes == 10
    assert (len(hf_train), len(hf_test)) == (300, 100)
    np.testing.assert_allclose(hf_train.x, train.x[:300], atol=1e-5)
    np.testing.assert_array_equal(hf_test.y, test.y[:100])
