/*
 * khibernate purgatory: the code a kexec jump image starts in (x86_64, position independent).
 *
 * relocate_kernel (arch/x86/kernel/relocate_kernel_64.S) has swapped the segments into place and, for a
 * KEXEC_PRESERVE_CONTEXT image, calls us with `call *%rdx` on the identity-mapped kexec page tables, interrupts
 * off, %rsp at the top of the image's swap page: 0(%rsp) is the address the first kernel resumes at when the
 * second kernel jumps back (its kexec control page + 0xf2 on 6.12).  We
 *   1. save that return address in jump_back_entry and write it as 16 hex digits at entry_digits, the
 *      placeholder in the second kernel's command line (" kexec_jump_back_entry=0x0000000000000000");
 *   2. load a GDT with flat __BOOT_CS (0x10) / __BOOT_DS (0x18), reload CS/DS/ES/SS (64-bit boot protocol,
 *      Documentation/arch/x86/boot.rst);
 *   3. jump to the kernel's 64-bit entry (load address + 0x200) with %rsi = boot_params.
 * A crash image loaded through Xen's kexec (xen.py) first copies the crashed host's low memory into its backup
 * segment (backup_src/dst/len), which the crash kernel's e820 lets it reuse and its elfcorehdr points at, as
 * kexec-tools' purgatory does; Xen calls the entry the same way (`call *%rbp`, identity-mapped segments).
 * The loader patches the parameter block (offsets 0x08..0x3f) in the assembled bytes; see purgatory.py.
 */
	.text
	.code64
	/* no global symbols: every reference is resolved by the assembler, so objcopy -O binary is enough */
purgatory_start:
	jmp	start

	.balign	8
kernel_entry:		.quad 0		/* 0x08: physical address of the 64-bit entry */
boot_params:		.quad 0		/* 0x10: physical address of struct boot_params */
entry_digits:		.quad 0		/* 0x18: physical address of the 16 digits to fill, 0 = none */
jump_back_entry:	.quad 0		/* 0x20: the return address found on the stack (run time) */
backup_src:		.quad 0		/* 0x28: a crash image's backup: copy backup_len bytes from here */
backup_dst:		.quad 0		/* 0x30: ... to here (in the crash region) before the kernel starts */
backup_len:		.quad 0		/* 0x38: bytes, a multiple of 8; 0 = no backup */

	.balign	16
gdt:
	.quad	0x0000000000000000
	.quad	0x0000000000000000
	.quad	0x00af9a000000ffff	/* 0x10 __BOOT_CS: 64-bit code, execute/read, flat */
	.quad	0x00cf92000000ffff	/* 0x18 __BOOT_DS: data, read/write, flat 4G */
gdt_end:
	.balign	8
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	0			/* base, filled at run time (we are position independent) */

hex:	.ascii	"0123456789abcdef"

start:
	cli
	cld
	movq	0(%rsp), %rax
	movq	%rax, jump_back_entry(%rip)
	leaq	stack_end(%rip), %rsp

	movq	backup_len(%rip), %rcx
	testq	%rcx, %rcx
	jz	0f
	movq	backup_src(%rip), %rsi
	movq	backup_dst(%rip), %rdi
	shrq	$3, %rcx
	rep movsq
0:
	movq	entry_digits(%rip), %rdi
	testq	%rdi, %rdi
	jz	2f
	leaq	hex(%rip), %rsi
	addq	$15, %rdi
	movl	$16, %ecx
1:	movl	%eax, %edx
	andl	$0xf, %edx
	movb	(%rsi,%rdx), %dl
	movb	%dl, (%rdi)
	shrq	$4, %rax
	decq	%rdi
	decl	%ecx
	jnz	1b
2:
	leaq	gdt(%rip), %rax
	movq	%rax, gdt_desc+2(%rip)
	lgdt	gdt_desc(%rip)
	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	3f(%rip), %rax
	pushq	$0x10
	pushq	%rax
	lretq
3:
	movq	boot_params(%rip), %rsi
	movq	kernel_entry(%rip), %rax
	xorl	%ebx, %ebx
	xorl	%ebp, %ebp
	xorl	%edi, %edi
	jmpq	*%rax

	.balign	16
stack:
	.fill	512, 1, 0
stack_end:
