"""A9: grade._close and grade._numeric_verdict on a hand-checked table. Each answer goes through the reference
cleaning and parser (grade._clean, grade._parse), as in is_equiv; the expected verdict was worked out by hand from
the rules in A9_numeric_equivalence.md (the reason is in the table)."""
from fractions import Fraction

import pytest

import grade
pytestmark = pytest.mark.A9

T, F, CONFIRM, UNKNOWN, ABSURD = True, False, "confirm", "unknown", "absurd"

# (a, b, verdict, why)
TABLE = [
    # two exact values: equal or not, no tolerance (unless one side is written as a decimal)
    (r"\frac{1}{2}", "0.5", T, "exact: 1/2 = 5/10"),
    ("2", r"\frac{4}{2}", T, "exact fractions"),
    ("3", "4", F, "exact fractions that differ"),
    (r"\frac{1}{3}", r"\frac{100000000001}{300000000000}", F,
     "two fractions 1e-11 apart, no decimal: exact, no tolerance at all"),
    ("2^{10}", "1024", T, "an exact power"),
    ("0.1+0.2", "0.3", T, "decimals are exact fractions: 1/10 + 2/10 = 3/10"),
    ("-0", "0", T, "exact zero"),
    ("1e3", "1000", T, "scientific notation is exact"),
    # a decimal against a rational: only float noise (1e-9 relative) is forgiven
    ("18", "18.000000000000004", T, "float noise"),
    (r"\frac{1}{3}", "0.3333333333", T, "ten 3s: within 1e-9 relative of 1/3"),
    (r"\frac{1}{3}", "0.333", F, "0.333 is not 1/3"),
    ("1234.5", "1234.6", F, "decimals that differ"),
    ("7", "7.00004", F, "5.7e-6 relative: more than float noise"),
    ("0.5", r"\frac{1}{2}+10^{-12}", T, "1e-12 apart: float noise"),
    # a decimal against an irrational value: 1e-4 relative
    (r"\sqrt{2}", "1.41421", T, "2.5e-6 relative"),
    (r"\sqrt{2}", "1.41422", T, "4.5e-6 relative"),
    (r"\sqrt{2}", "1.414", F, "1.5e-4 relative: more than 1e-4"),
    (r"\pi", "3.14", F, "5e-4 relative"),
    (r"\pi", "3.14159", T, "8.4e-7 relative"),
    (r"4\pi", "12.566370614359172", T, "float value of 4 pi"),
    ("2^{0.5}", r"\sqrt{2}", T, "a decimal exponent: the decimal rule, 1e-4"),
    # two inexact values, no decimal: agreement to 1e-9 only says "confirm" (sympy decides), a near miss "unknown"
    (r"\sqrt{2}", r"\frac{\sqrt{8}}{2}", CONFIRM, "equal as floats; sympy makes it certain"),
    (r"\sqrt{2}", r"\sqrt{3}", F, "far apart"),
    (r"\sqrt{2}", r"\frac{1414214}{1000000}", UNKNOWN, "3e-7 apart: within 1e-6 but not 1e-9, sympy's 40 digits decide"),
    (r"\frac{22}{7}", r"\pi", F, "4e-4 apart, no decimal: False"),
    (r"\sqrt{2}", r"\frac{14142}{10000}", F, "9.6e-6 relative, no decimal: beyond 1e-6, False without sympy"),
    (r"\sqrt{2}", r"\frac{141421356}{100000000}", UNKNOWN, "1.7e-9 relative: beyond 1e-9, within 1e-6, sympy decides"),
    (r"\cosh(800)", "5", UNKNOWN, "cosh 800 overflows a float: an arithmetic error is unknown, never an exception"),
    ("e^{i\\pi}", "-1", CONFIRM, "complex arithmetic: e^{i pi} = -1 as floats"),
    (r"\sqrt{-4}", "2i", CONFIRM, "a complex root"),
    ("3+4i", "3-4i", F, "complex values that differ"),
    # expressions in variables, at the fixed points
    ("x^2 - 1", "(x-1)(x+1)", CONFIRM, "equal at every point"),
    ("2x", "x+x", CONFIRM, "equal at every point"),
    ("0.5x", r"\frac{x}{2}", CONFIRM, "with variables a decimal changes nothing: confirm"),
    ("a+b", "b+a", CONFIRM, "two variables"),
    (r"\frac{1}{a-b}", r"\frac{-1}{b-a}", CONFIRM, "two variables, each at its own value"),
    ("x + 1", "x + 2", F, "differ at the first point"),
    ("x", "5", F, "a variable against a number: values at the points differ"),
    ("x^2", "y^2", F, "different variables take different values"),
    ("x", "y", F, "different variables"),
    ("x^{1000}", "x^{1001}", F, "both ~0 at x = 0.618 (close), far apart at x = 1.32: every point counts"),
    (r"\lfloor x \rfloor", "0", F, "0 = 0 at x = 0.618, 1 != 0 at 1.32"),
    ("(x+1)^2", "x^2+2x+1.0001", F, "1e-4 apart at every point"),
    ("x^2", "x^2+10^{-7}", F, "1e-7 apart: 2.6e-7 relative at x = 0.618, more than the 1e-8 expressions are allowed"),
    ("(x+10^7)-10^7", "x", CONFIRM, "float rounding of 1e7 + x leaves ~1e-9 relative: within 1e-8, confirm"),
    ("a-b", r"-\frac{37}{100}", CONFIRM, "sorted variables: a gets the point, b the point + 0.37, so a - b = -0.37"),
    ("1000a+100b+10c+d", "1111a+45.51", CONFIRM,
     "a, b, c, d (sorted) get the point + 0, 0.37, 0.74, 1.11: 1111a + 37 + 7.4 + 1.11; any other order differs"),
    (r"\frac{1}{(\lfloor x \rfloor-1)(\lfloor x \rfloor-2)}", r"\frac{2}{2(\lfloor x \rfloor-1)(\lfloor x \rfloor-2)}",
     CONFIRM, "defined at the first point only (floor 1.32 = 1, floor 2.154 = 2 divide by 0): one agreement confirms"),
    (r"\lfloor x \rfloor", r"\lfloor x - 0.3 \rfloor", F,
     "equal at x = 0.618 and 1.32 (0, 1), not at 2.154 (2 vs 1): a single variable takes each point itself"),
    (r"\lfloor x \rfloor", r"\lfloor x + 0.3 \rfloor", CONFIRM, "0, 1, 2 on both sides at x = 0.618, 1.32, 2.154"),
    (r"\frac{1}{\lfloor x \rfloor}", r"\frac{2}{2\lfloor x \rfloor}", CONFIRM,
     "undefined at the first point (floor 0.618 = 0, and floor has no complex value), equal at the other two: "
     "a point where neither is defined is skipped, the rest still confirm"),
    ("|x|", r"\sqrt{x^2}", CONFIRM, "equal at the real points (the complex one is tried only where a real one fails)"),
    (r"\frac{1}{(x-0.6180339887)(x-1.3247179572)(x-2.1543469014)}",
     r"\frac{2}{2(x-0.6180339887)(x-1.3247179572)(x-2.1543469014)}", CONFIRM,
     "undefined at each real point (division by 0): compared at the complex points instead"),
    (r"\frac{1}{x-x}", "5", UNKNOWN, "undefined at every point, real and complex: nothing agreed"),
    # infinities
    (r"\infty", r"\infty", T, "the same infinity"),
    (r"-\infty", r"-\infty", T, "the same infinity"),
    (r"-\infty", r"\infty", F, "opposite infinities"),
    (r"\infty", r"-\infty", F, "opposite infinities"),
    (r"\infty", "5", F, "infinity is no number"),
    (r"\infty", r"\infty + 1", UNKNOWN, "arithmetic with infinity: sympy's business"),
    (r"\infty", r"x + \infty", UNKNOWN, "an expression holding an infinity, variables or not: sympy's business"),
    # what numbers cannot settle
    (r"10^{10^{10}}", "5", ABSURD, "a value far beyond 10^300: refused"),
    (r"\frac{1}{0}", "5", UNKNOWN, "undefined (division by zero): unknown, no exception"),
    ("5", r"\frac{1}{x-x}", UNKNOWN, "undefined at every point, the undefined side second"),
]


def tree(text):
    return grade._parse(grade._clean(text))


@pytest.mark.parametrize("a, b, verdict, why", TABLE, ids=[f"{a} vs {b}" for a, b, _, _ in TABLE])
def test_numeric_verdict_table(a, b, verdict, why):
    """_numeric_verdict: True / False / "confirm" / "unknown" / "absurd" on the hand-checked table"""
    got = grade._numeric_verdict(tree(a), tree(b))
    assert got == verdict and type(got) is type(verdict), (
        f"{a!r} vs {b!r}: expected {verdict!r} ({why}), got {got!r}")


@pytest.mark.parametrize("a, b, verdict, why", [row for row in TABLE if row[2] in (T, F, CONFIRM)][:20],
                         ids=[f"{a} vs {b}" for a, b, v, _ in TABLE if v in (T, F, CONFIRM)][:20])
def test_numeric_verdict_is_symmetric(a, b, verdict, why):
    """_numeric_verdict: swapping the two answers gives the same verdict"""
    assert grade._numeric_verdict(tree(b), tree(a)) == verdict, f"{b!r} vs {a!r} (swapped): expected {verdict!r}"


def test_numeric_verdict_never_raises():
    """_numeric_verdict: odd inputs give a verdict, never an exception"""
    for a, b in [(r"10^{10^{10}}", r"10^{10^{10}}"), (r"0^{-1}", "1"), (r"\log_1 5", "2"), (r"\frac{x}{0}", "x"),
                 (r"(-1)!", "1"), (r"\binom{-1}{2}", "3")]:
        got = grade._numeric_verdict(tree(a), tree(b))
        assert got in (True, False, CONFIRM, UNKNOWN, ABSURD), f"{a!r} vs {b!r}: got {got!r}"


# --------------------------------------------------------------------------- _close
def test_close_is_relative_to_the_larger_magnitude():
    """_close(x, y, rel): |x - y| <= rel * max(|x|, |y|), or |x - y| <= 1e-12"""
    assert grade._close(1.0, 1.0 + 1e-10, 1e-9) is True
    assert grade._close(1.0, 1.01, 1e-3) is False
    assert grade._close(100.0, 101.0, 0.00995) is True, "1 <= 0.00995 * max(100, 101) = 1.005: close (max, not min)"
    assert grade._close(101.0, 100.0, 0.00995) is True, "symmetric"
    assert grade._close(100.0, 101.0, 0.0099) is False, "1 > 0.0099 * 101 = 0.9999"
    assert grade._close(1.0, 2.0, 0.5) is True, "|1 - 2| = 1 <= 0.5 * 2: the bound itself counts as close (<=)"


def test_close_has_an_absolute_floor_for_zero():
    """_close: near 0 a relative tolerance means nothing; 1e-12 absolute still counts as equal"""
    assert grade._close(0.0, 1e-13, 0.0) is True, "1e-13 apart: within the absolute floor 1e-12"
    assert grade._close(0.0, 1e-11, 1e-9) is False, "1e-11 apart around 0: relative 1e-9 of 1e-11 is 1e-20, floor 1e-12"
    assert grade._close(0.0, 0.0, 0.0) is True


def test_close_takes_complex_numbers_and_fractions():
    """_close: compares complex values (and Fractions) by the modulus of the difference"""
    assert grade._close(1 + 1j, 1 + 1j + 1e-10, 1e-9) is True
    assert grade._close(1 + 1j, 1 - 1j, 1e-3) is False
    assert grade._close(3j, 3.0001j, 1e-4) is True, "|3j - 3.0001j| = 1e-4 <= 1e-4 * 3.0001"
    assert grade._close(Fraction(1, 3), 0.3333333333, 1e-9) is True
    assert grade._close(Fraction(1, 3), Fraction(1, 3), 0.0) is True
