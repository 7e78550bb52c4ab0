"""datasets.py: where the songs come from (MUSDB18, stems folders, the synthetic set), the cache, the held-apart
tracks and the levels of the sources."""
import time

import numpy as np
import pytest
import soundfile as sf

import audio
import data_generator as dg
import datasets
import utils
from conftest import make_stems_folder, make_wav_dataset, MIR1K, MUSDB7, needs_ffmpeg, needs_shared


def test_dataset_path_errors_are_one_line(tmp_path):
    with pytest.raises(utils.DataError, match="no such folder"):
        datasets.find_data_source(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(utils.DataError, match="no MUSDB18 tracks"):
        datasets.find_data_source(tmp_path)


def test_non_interactive_without_a_dataset_falls_back_to_synthetic_with_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(datasets, "REPO_DIR", tmp_path)
    monkeypatch.setattr(datasets, "PREVIEW_DIR", tmp_path / "MUSDB18" / "MUSDB18-7")
    source = datasets.find_data_source(interactive=False)
    assert source.kind == "synthetic"
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning:") and "SYNTHETIC" in err and len(err.splitlines()) == 1


@needs_ffmpeg
def test_failed_download_is_a_clear_warning_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    import urllib.error
    import musdb

    def offline(*args, **kwargs):
        (tmp_path / "MUSDB18" / "MUSDB18-7").mkdir(parents=True)  # musdb creates its root first
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "REPO_DIR", tmp_path)
    monkeypatch.setattr(datasets, "PREVIEW_DIR", tmp_path / "MUSDB18" / "MUSDB18-7")
    monkeypatch.setattr(musdb, "DB", offline)
    source = datasets.find_data_source(download=True, interactive=False)
    out, err = capsys.readouterr()
    assert source.kind == "synthetic" and out == ""
    assert "download of the MUSDB18 previews failed" in err and "offline" in err
    assert not (tmp_path / "MUSDB18" / "MUSDB18-7").exists()


def test_asking_for_more_songs_than_exist_uses_all_with_a_warning(tmp_path, capsys):
    # the last is in musdb's valid split
    make_wav_dataset(tmp_path / "hq", ["A - Train One", "B - Train Two", "ANiMAL - Rockshow"], seconds=2.0)
    source = datasets.find_data_source(tmp_path / "hq")
    assert source.kind == "musdb" and source.is_wav
    tracks = datasets.load_tracks(source, "train", 50, tmp_path / "cache", progress=False)
    assert [t.name for t in tracks] == ["A - Train One", "B - Train Two"]
    assert tracks[0].vocals.shape == (2, 2 * dg.SAMPLE_RATE)
    out, err = capsys.readouterr()
    assert out == "" and "warning: --n-songs 50: only 2 train tracks exist" in err
    assert not any(p.suffix == ".npy" for p in (tmp_path / "hq").rglob("*"))  # nothing beside the dataset


@needs_shared
@needs_ffmpeg
def test_musdb_loader_on_the_shared_previews(tmp_path, monkeypatch):
    source = datasets.find_data_source(MUSDB7)
    assert source.kind == "musdb" and not source.is_wav
    assert len(datasets.musdb_tracks(source, "train", "train")) == 80
    valid_names = [t.name for t in datasets.musdb_tracks(source, "train", "valid")]
    assert len(valid_names) == 14 and "ANiMAL - Rockshow" in valid_names
    tracks = datasets.load_tracks(source, "valid", 2, tmp_path, progress=False)
    assert [t.name for t in tracks] == valid_names[:2]
    for track in tracks:
        assert track.vocals.shape[0] == 2 and track.vocals.shape == track.accompaniment.shape
        # ~6.8 s at 8192 Hz: about 73 frames, shorter than one 128-frame patch
        assert 6.0 < track.vocals.shape[1] / dg.SAMPLE_RATE < 7.5
        assert dg.n_frames(track.vocals.shape[1]) < dg.PATCH_FRAMES
        assert np.abs(track.vocals).max() > 0.01 and np.isfinite(track.mixture).all()
        mixture, target = dg.validation_patches(track)
        assert mixture.shape == (2, 1, 512, 128)  # short tracks are padded, not dropped
    # the second load reads the cache and never decodes
    import musdb
    monkeypatch.setattr(musdb.MultiTrack, "stems", property(lambda self: pytest.fail("decoded again")))
    t0 = time.time()
    again = datasets.load_tracks(source, "valid", 2, tmp_path, progress=False)
    assert np.array_equal(again[0].vocals, tracks[0].vocals)
    assert time.time() - t0 < 5


def test_tracks_read_together_keep_their_order_and_the_first_error_stops_the_rest(monkeypatch):
    monkeypatch.setattr(datasets, "LOADERS", 2)
    # the later items finish first: the result must still follow the items, not the finishing order
    slow_first = datasets.load_all(lambda i: time.sleep(0.05 * (4 - i)) or i * 10, range(5), "t", progress=False)
    assert slow_first == [0, 10, 20, 30, 40]
    started = []

    def load(i):
        started.append(i)
        if i == 1:
            raise utils.DataError("track 1: not a readable audio file")
        time.sleep(0.1)
        return i
    with pytest.raises(utils.DataError, match="track 1"):
        datasets.load_all(load, range(40), "t", progress=False)
    assert 2 <= len(started) < 10  # read two at a time, and not started after the error



# stems folders (train.py --stems) ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["accompaniment", "mixture", "parts", "mir1k"])
def test_every_stems_layout_reads_the_same_stems(layout, tmp_path):
    """vocals + accompaniment, vocals + mixture (accompaniment = mixture - vocals), vocals + drums, bass, other
    (summed), and MIR-1K's stereo files (accompaniment left, voice right) give back the stems that were written."""
    written = make_stems_folder(tmp_path, ["b_song_1", "a_song_2"], layout)
    entries = datasets.stems_entries(tmp_path)
    assert [e.name for e in entries] == ["a_song_2", "b_song_1"] and {e.layout for e in entries} == {layout}
    stems, rate = datasets.read_stems(entries[0])
    expected = written["a_song_2"]
    channels = 1 if layout == "mir1k" else 2
    assert rate == 16000 and stems["vocals"].shape == stems["accompaniment"].shape == (channels, 48000)
    assert np.abs(stems["vocals"] - expected.vocals[:channels]).max() < 1e-4  # 16-bit flac/wav rounding
    assert np.abs(stems["accompaniment"] - expected.accompaniment[:channels]).max() < 1e-3


def test_stems_tracks_are_cached_at_8192_hz_and_a_mono_stem_meets_a_stereo_one(tmp_path):
    folder = tmp_path / "stems" / "song_1"
    folder.mkdir(parents=True)
    t = np.arange(44100 * 2) / 44100
    sf.write(str(folder / "vocals.wav"), 0.3 * np.sin(2 * np.pi * 440 * t), 44100)  # mono
    sf.write(str(folder / "accompaniment.ogg"), np.stack([0.1 * np.sin(2 * np.pi * 110 * t)] * 2).T, 44100)
    tracks = datasets.load_stems_tracks(tmp_path / "stems", "all", tmp_path / "cache", progress=False)
    assert len(tracks) == 1 and tracks[0].vocals.shape == tracks[0].accompaniment.shape == (2, 2 * dg.SAMPLE_RATE)
    assert np.array_equal(tracks[0].vocals[0], tracks[0].vocals[1])  # the mono voice on both channels
    assert list((tmp_path / "cache").rglob("vocals.npy")) and not list((tmp_path / "stems").rglob("*.npy"))
    again = datasets.load_stems_tracks(tmp_path / "stems", "all", tmp_path / "cache", progress=False)
    assert isinstance(again[0].vocals, np.memmap)


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "no such folder"),
    (lambda root: (root / "empty").mkdir(parents=True), "no tracks found"),
    (lambda root: (root / "song").mkdir(parents=True)
     or sf.write(str(root / "song" / "vocals.wav"), np.zeros(800), 8000),
     "has vocals but no accompaniment"),
])
def test_stems_folder_problems_are_one_line(make, message, tmp_path):
    make(tmp_path / "in")
    root = tmp_path / "in" / "empty" if message == "no tracks found" else tmp_path / "in"
    with pytest.raises(utils.DataError, match=message):
        datasets.stems_entries(root)


def test_stems_of_very_different_lengths_are_refused(tmp_path):
    (tmp_path / "song").mkdir()
    sf.write(str(tmp_path / "song" / "vocals.wav"), np.zeros(8000 * 5), 8000)
    sf.write(str(tmp_path / "song" / "accompaniment.wav"), np.zeros(8000 * 3), 8000)
    with pytest.raises(utils.DataError, match="differ in length by more than 1 s"):
        datasets.read_stems(datasets.stems_entries(tmp_path)[0])


def test_held_apart_tracks_are_whole_groups_from_the_end_of_the_names():
    """MIR-1K's clips are <singer>_<song>_<n>: the last singers by name, at least a tenth of the clips.
    Names without groups: the last tenth. One group: the last tenth of its tracks. One track: none."""
    names = [f"{singer}_{song}_{n:02d}" for singer in ("Ani", "amy", "bob", "titon", "yifen") for song in (1, 2)
             for n in range(1, 5)]  # 40 clips, 8 per singer
    assert datasets.held_apart(names) == {n for n in names if n.startswith(("yifen",))}  # 8 >= 4
    few = [n for n in names if not n.startswith("yifen")][:20] + names[-2:]  # Ani 8, amy 8, bob 4, yifen 2
    # 2 < 3 needed: and bob
    assert datasets.held_apart(few) == set(names[-2:]) | {n for n in few if n.startswith("bob")}
    artists = [f"Artist {i} - Song" for i in range(10, 30)]
    assert datasets.held_apart(artists) == {"Artist 28 - Song", "Artist 29 - Song"}
    assert datasets.held_apart([f"take_{i:02d}" for i in range(20)]) == {"take_18", "take_19"}
    assert datasets.held_apart(["only"]) == set()


def test_stems_splits_partition_the_folder(tmp_path):
    make_stems_folder(tmp_path, [f"s{i}_x" for i in range(12)], seconds=0.5)
    train, valid = (datasets.stems_split(tmp_path, split) for split in ("train", "valid"))
    assert [e.name for e in valid] == ["s8_x", "s9_x"]  # sorted as strings: s0, s1, s10, s11, s2, ..., s9
    assert len(train) == 10 and not {e.name for e in train} & {e.name for e in valid}


def test_levels_of_other_sources_are_matched_to_the_first():
    """Gains make each source's median stem RMS the first source's; the first keeps 1 (its batches unchanged)."""
    def tracks(vocals_level, accompaniment_level, n=5):
        return [audio.Track(f"t{i}", np.full((1, 800), vocals_level * (1 + i / 10), np.float32),
                         np.full((1, 800), accompaniment_level, np.float32)) for i in range(n)]
    musdb, mir = datasets.match_levels([tracks(0.05, 0.2), tracks(0.2, 0.2)])
    assert all(t.gains == (1.0, 1.0) for t in musdb)
    assert mir[0].gains == pytest.approx((0.25, 1.0))



@pytest.mark.skipif(not MIR1K.is_dir(), reason="../shared/data/MIR-1K not present")
def test_mir1k_as_shared_holds_15_singers_and_two_are_held_apart():
    entries = datasets.stems_entries(MIR1K)
    assert len(entries) == 823 and {e.layout for e in entries} == {"accompaniment"}
    apart = datasets.held_apart([e.name for e in entries])
    assert {n.split("_")[0] for n in apart} == {"titon", "yifen"} and len(apart) == 110
