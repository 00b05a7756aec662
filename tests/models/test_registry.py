from __future__ import annotations

import pytest

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models import registry


@pytest.fixture
def folders(tmp_path, monkeypatch):
    user = tmp_path / "user"
    shipped = tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setattr(registry, "user_model_dir", lambda: user)
    monkeypatch.setattr(registry, "SHIPPED_MODEL_DIR", shipped)
    return user, shipped


def test_names_resolve_user_first_then_shipped(folders):
    user, shipped = folders
    (shipped / "cardiac.safetensors").write_bytes(b"x")
    (shipped / "brain.safetensors").write_bytes(b"x")
    (user / "cardiac.safetensors").write_bytes(b"x")
    entries = registry.list_models()
    assert [(e.name, e.source) for e in entries] == [
        ("cardiac", "user"),
        ("brain", "shipped"),
        ("cardiac", "shipped"),
    ]
    assert registry.resolve_model("cardiac") == user / "cardiac.safetensors"
    assert registry.resolve_model("brain.safetensors") == shipped / "brain.safetensors"


def test_a_path_is_used_as_it_is(folders, tmp_path):
    path = tmp_path / "elsewhere.safetensors"
    path.write_bytes(b"x")
    assert registry.resolve_model(path) == path
    assert registry.resolve_model(str(path)) == path


def test_unknown_name_lists_the_known_ones(folders):
    _, shipped = folders
    (shipped / "brain.safetensors").write_bytes(b"x")
    with pytest.raises(FewLabelError, match="Known names: brain"):
        registry.resolve_model("liver")


def test_default_user_folder_is_per_user_data_dir():
    assert registry.user_model_dir().name == "models"
    assert "napari-fewlabel" in str(registry.user_model_dir())


def test_a_jobs_resume_state_is_not_listed_as_a_model(folders):
    user, _ = folders
    (user / "encoder.safetensors").write_bytes(b"x")
    (user / "encoder.state.safetensors").write_bytes(b"x")  # written by fewlabel pretrain
    assert [e.name for e in registry.list_models()] == ["encoder"]
