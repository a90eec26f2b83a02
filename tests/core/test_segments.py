from e3rl.core.segments import SegmentSpec, StreamSegmenter, fixed_windows, segment_lengths


def test_fixed_windows_paper_layout():
    spans = fixed_windows(16 * 512, 512)
    assert len(spans) == 16 and spans[0] == (0, 512) and spans[-1] == (7680, 8192)
    assert fixed_windows(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_streaming_fixed_closes_every_length_tokens():
    seg = StreamSegmenter(SegmentSpec(mode="fixed", length=3))
    cuts = [seg.push("x") for _ in range(7)]
    assert cuts == [None, None, 3, None, None, 3, None] and seg.open_len == 1


def test_newline_delimiter_respects_min_and_max():
    spec = SegmentSpec(mode="delimiter", delimiter="newline", min_len=2, max_len=4)
    # "\n" after 1 token is too early; after 3 tokens it cuts; 4 tokens without newline force-cut
    assert segment_lengths(["a\n", "b", "c\n", "d", "e", "f", "g", "h"], spec) == [3, 4, 1]


def test_blank_line_spanning_two_tokens():
    spec = SegmentSpec(mode="delimiter", delimiter="blank_line", min_len=1, max_len=99)
    assert segment_lengths(["one", ".\n", "\n", "two", "\n", "x"], spec) == [3, 3]


def test_step_header_cuts_before_the_header_line_and_carries_it():
    spec = SegmentSpec(mode="delimiter", delimiter="step", min_len=2, max_len=99)
    seg = StreamSegmenter(spec)
    cuts = [seg.push(t) for t in ["Step", " 1", ":", " a", ".\n", "Step", " 2", ":", " b"]]
    assert cuts == [None] * 6 + [5, None, None]  # closed "Step 1: a.\n", carried "Step 2"
    assert seg.open_len == 4


def test_reset_empties_open_segment():
    seg = StreamSegmenter(SegmentSpec(mode="fixed", length=3))
    seg.push("a"); seg.push("b"); seg.reset()
    assert [seg.push("c") for _ in range(3)] == [None, None, 3]
