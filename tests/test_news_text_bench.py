"""benchmarks/news_text.py on a stand-in wheel (a zip holding the two corpus files): no download."""

import zipfile

from benchmarks import news_text


def test_news_lines_are_each_files_articles_in_order_decoded(tmp_path):
    wheel = tmp_path / "gensim-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        # Latin-1 as in gensim's files; the background set ends without a newline, as there
        z.writestr(news_text.FILES[0], "Prices rose to \u00a3300.\n\n  A second article.  ".encode("latin-1"))
        z.writestr(news_text.FILES[1], "The test set's article.\n".encode("latin-1"))
    assert news_text.news_lines(wheel) == ["Prices rose to \u00a3300.", "A second article.", "The test set's article."]
    out = tmp_path / "news.txt"
    assert news_text.main(["--out", str(out), "--wheel", str(wheel)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == news_text.news_lines(wheel)
